"""clipa: affordable CLIP training by the inverse scaling law (CLIPA).

The command line (`clipa ...`) is a thin layer over plain functions that a notebook can call:

    from clipa.recipe.load import load_recipe
    from clipa.train.trainer import train
    run_dir = train(load_recipe("recipes/tiny/pretrain.toml"), stage="pretrain")
"""

__version__ = "0.1.0"
