"""The Ray Serve application, for `serve deploy` / `serve run` configs.

`raydistill deploy` writes runs/NAME/deploy/serve_config.yaml pointing here:

    import_path: serve.app:build
    args: {weights: .../student.safetensors, sha256: ..., onnx: .../student.int8.onnx,
           onnx_sha256: ..., version: ..., deploy: {...}}

(onnx and onnx_sha256 are null when the replicas run the PyTorch student.)
"""

from raydistill.config import DeployConfig
from raydistill.serving import ServedModel, build_app


def build(args: dict):
    """Application builder: args from the serve config -> bound deployment."""
    model = ServedModel(args["weights"], args.get("sha256"), args.get("onnx"), args.get("onnx_sha256"))
    return build_app(model, DeployConfig.model_validate(args.get("deploy", {})), args.get("version", "1"))
