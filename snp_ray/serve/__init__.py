"""The market as a service (issue #15): ``snp serve`` / ``serve run snp_ray/serve/serve.yaml``.

``MarketService`` answers without HTTP (catalogue, content-addressed packs, single flight);
``create_api`` puts FastAPI routes and the web page over it; ``deploy`` runs it on Ray Serve.
"""
from snp_ray.serve.config import ServeConfig

__all__ = ["ServeConfig"]
