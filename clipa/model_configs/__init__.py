"""open_clip model configs bundled with clipa (registered with open_clip on import of clipa.model.build)."""
