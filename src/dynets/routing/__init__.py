"""Dynamic routing: routers that send each sample along one of several branches (or down a tree).
Import the submodules directly."""
