"""Pod addresses: the pool and its cooldown (``ipam``), the pure warm-pool policy
(``pool_math``) and the refiller that carries it out against the cloud (``refiller``)."""
