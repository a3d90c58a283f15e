"""The Ray Serve application, for `serve deploy` / `serve run` configs.

`raydistill deploy` writes runs/NAME/deploy/serve_config.yaml pointing here:

    import_path: serve.app:build
    args: {weights: .../student.safetensors, sha256: ..., version: ..., deploy: {...}}
"""

from raydistill.config import DeployConfig
from raydistill.serving import build_app


def build(args: dict):
    """Application builder: args from the serve config -> bound deployment."""
    return build_app(
        weights=args["weights"],
        sha256=args.get("sha256"),
        deploy=DeployConfig.model_validate(args.get("deploy", {})),
        version=args.get("version", "1"),
    )
