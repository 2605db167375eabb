"""What a study stores and how it is read back: objectives, completed points and fronts, capacity results,
the storage URL. Below `study` (which runs studies), `report`, `tracking`, `export` and `sweep` (which read
them), so that none of those needs the package that runs studies."""
