"""Device mesh (`mesh`), logical-axis sharding rules (`rules`, config data in `config`) and
multi-process initialization (`distributed`)."""
