"""Model packages: a card (TOML) plus safetensors weights, loaded without pickle."""
