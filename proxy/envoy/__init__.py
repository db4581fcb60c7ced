"""The Envoy data plane: the sidecar process drives an Envoy over xDS.

The compiled configuration (`mesh.compiled`) is translated into Envoy resources
(`proxy.envoy.translate`, pure), served over ADS/SDS on a Unix socket private to the
sidecar (`proxy.envoy.xds_server`) to an Envoy the sidecar runs and supervises
(`proxy.envoy.process`). See docs/architecture.md, "The two data planes".
"""
