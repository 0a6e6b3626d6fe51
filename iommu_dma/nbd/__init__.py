"""A namespace served over NBD by nbdkit: `export` (the NBD operations on a Namespace),
`plugin` (the script nbdkit's python plugin loads), `server` (starting and stopping nbdkit)."""
