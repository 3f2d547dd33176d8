"""An emulated internet on one Linux machine, for the WAN tests (tests/test_wan.py) and bench_wan.py.

Every node runs in its own network namespace; a "wan" namespace holds a bridge that plays the internet
(10.77.0.0/24); a sampler "at home" sits behind its own NAT router namespace (10.77.<home>.0/24, nftables
masquerade and a stateful firewall, no port forwarding). Per-link bandwidth caps are kernel ``tbf`` qdiscs on the
veth ends (upload: egress of the host, download: egress towards the host). ``netem`` is absent on these kernels, so
latency comes from a small user-space relay (:mod:`.delay_relay`) in every host namespace: an nftables ``redirect``
sends every TCP connection the host opens towards 10.77.0.0/16 through it, and it holds every byte for the path's
one-way delay (the sum of both hosts' access delays) in each direction. See :mod:`.topology`.

Root, iproute2 and nftables are needed (``apt-get install iproute2 nftables``); :func:`topology.missing_features`
says precisely what is missing. Nothing leaves the namespaces the emulator creates (names start with a per-run
prefix) and :meth:`topology.Wan.close` removes all of them, with every process it started.
"""
