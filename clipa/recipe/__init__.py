"""Recipes: the dataclasses a run is described by (`schema`), reading and overriding them (`load`), the checks
(`checks`: values, batch layout, resume compatibility) and the recipes shipped with clipa (`index`)."""
