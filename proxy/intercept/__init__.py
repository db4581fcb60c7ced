"""Transparent interception (`meshctl sidecar --intercept`, docs/architecture.md §5.4):
the app's network namespace and nftables rules, the capture listener, protocol
detection, virtual IPs and the DNS server."""
