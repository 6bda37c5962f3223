"""open_clip model configs bundled with clipa (registered with open_clip on first use: clipa.model.build.register_configs)."""
