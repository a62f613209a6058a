"""`incus-caddyfile watch`: the loop (`loop.Watcher`) and its parts, one module each."""
