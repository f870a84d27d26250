"""What every layer stands on: environment switches, tcmalloc, device meshes and sharding, the file-path layer, image sizes, install helpers."""
