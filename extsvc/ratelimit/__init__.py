"""The rate-limit service (``envoy.service.ratelimit.v3.RateLimitService``).

``config`` reads envoyproxy/ratelimit's domain files, ``algorithms`` holds the window and bucket
maths, ``limiter`` turns a request into store operations and statuses, ``store`` keeps the counters
(memory, Redis, Redis Cluster; ``store.builtin`` builds them from settings), ``convert`` and
``service`` speak the protocol. The pieces are kept across config reloads by the reload layer
(:mod:`extsvc.reload.ratelimit`), above this package.
"""
