"""Snakemake stages that turn image collections into feature stores."""
