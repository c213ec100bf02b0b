"""Routers, one file each; importing a module registers its routers."""
