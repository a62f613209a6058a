"""`watch --listen`: the state the watch loop holds, served over HTTP (health, readiness, routes,
metrics, a status page, the on-demand TLS `ask`), and the client `routes`/`doctor --from` use.

- `address`: what `--listen` and `--from` name (TCP or a unix socket), and which are loopback.
- `snapshot`: the immutable state the loop publishes after each cycle; plain data.
- `keeper`: the loop's observer that builds each snapshot and counts the metrics.
- `metrics`: Prometheus metrics over prometheus_client.
- `page`: the status page (a Jinja template shipped beside Caddyfile.j2).
- `listener`: the HTTP server, on its own threads, reading only the published snapshot.
- `client`: `routes --from` and `doctor --from`.
"""
