"""The model: building it from a recipe (`build`), image/text towers (`towers`), token reduction (`reduction`, `pos`)."""
