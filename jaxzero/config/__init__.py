"""The typed run config (`schema`, one frozen section per concern) and its YAML files."""

from jaxzero.config.files import load_config, save_config
from jaxzero.config.schema import RunConfig, config_from_dict

__all__ = ["RunConfig", "config_from_dict", "load_config", "save_config"]
