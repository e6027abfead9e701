"""Every steerexp part's spec (steerexp/spec.py) in Hydra's ConfigStore before Hydra composes.

Hydra asks every SearchPathPlugin to adjust the config search path each time it builds one, which is before
every compose (the CLI's, the compose API's, a sweep job's); this one leaves the path alone and (re)stores the
specs, so a ConfigStore replaced by a launcher that restores Hydra's singletons still has them. Torch-free."""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class SteerexpSpecs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from steerexp.spec import register_all

        register_all()
