"""Modules the compiler targets: plain PyTorch parts with no knowledge of YAML."""
