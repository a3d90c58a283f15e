"""An alias of the Serve application builder, which lives in the package
(`raydistill.serving:app`) so that `serve deploy` and jobs import the installed or submitted
code, whatever directory they run in. Kept for configs that name `serve.app:build`."""

from raydistill.serving import app as build  # noqa: F401
