"""HDM platform: Parquet datasets in object storage, Ray Train/Tune, MLflow and Ray Serve."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hdm-platform")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
