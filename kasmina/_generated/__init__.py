"""Files generated from spec/lifecycle.yaml by `python -m codegen`. Do not edit."""
