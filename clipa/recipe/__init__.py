"""Recipes: the validated dataclasses a run is described by (`schema`) and the recipes shipped with clipa (`index`)."""
