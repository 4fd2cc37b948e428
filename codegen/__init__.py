"""Code generation from spec/lifecycle.yaml: `python -m codegen`."""
