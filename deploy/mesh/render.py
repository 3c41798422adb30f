"""Write the service mesh's Envoy configs: one sidecar per service and the edge proxy the SDK talks to.

    python deploy/mesh/render.py --certs CERT_DIR --out OUT_DIR [--ports PORTS.json | --base-port 15000]
                                 [--policy deploy/mesh/policy.yaml] [--host 127.0.0.1] [--admin]

The one source of the mesh: this script, the policy table (policy.yaml: who may call whom) and the
edge's health routing (health_route.lua). CERT_DIR holds what scripts/mesh_certs.py mints: ``ca.pem``
and ``<identity>.pem``/``.key`` for the six services and ``edge``.

Written to OUT_DIR:
  envoy-edge.yaml     the edge: the SDK's one ``base_url`` (plaintext, and TLS when the ports name
                      ``tls``), routed by gRPC service path (``/tensafe.api.vault.v1.VaultService/`` -> the
                      vault ...) over mTLS to each service's inbound sidecar listener;
  envoy-<svc>.yaml    the service's sidecar: an inbound listener terminating mTLS (client certificate
                      required, CA-verified) whose RBAC filter admits exactly the SPIFFE identities the
                      policy lets call the service, forwarding plaintext to the service on 127.0.0.1; and
                      one plaintext outbound listener on 127.0.0.1 per peer the service calls, forwarded
                      over mTLS (presenting the service's certificate, checking the peer's SPIFFE id);
  <svc>.env           the service's settings: TENSAFE_HOST/PORT and ``TENSAFE_<PEER>_ENDPOINT`` pointing
                      at its outbound listeners (``TENSAFE_ENV_FILE=<svc>.env tensafe serve <svc>``);
  ports.json          every port, as used.

Hosts: everything on one machine by default (``--host``, 127.0.0.1). Apart (a pod per service, the
sidecar beside its service): ``--listen 0.0.0.0`` and an ``address`` per service in ports.json (a DNS
name is resolved by Envoy) where the others reach its inbound listener; the service and its outbound
listeners stay on the pod's loopback.

Ports: ``--ports`` names them (the layout of ports.json); otherwise from ``--base-port`` B: the edge
listens on B (TLS B+1, admin B+9), the i-th service of the policy (0-based) has its app on B+10(i+1),
inbound listener +1, admin +9 and its outbound listener to the j-th service at +2+j.

gRPC streams (Generate, WatchFutures, artifact transfers) last long: no route timeout and no stream
idle timeout anywhere; a call's own deadline (grpc-timeout) is honoured, HTTP/2 keepalive finds dead
connections. Health: Check/Watch carry the service asked about in the body; the edge's Lua filter
routes them to that service. Reflection: by the ``x-tensafe-service`` header (``grpcurl -H
'x-tensafe-service: vault'``); without it, UNIMPLEMENTED.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_POLICY = HERE / "policy.yaml"
HEALTH_LUA = HERE / "health_route.lua"
ROUTE_HEADER = "x-tensafe-service"
TLS_SOCKET = "envoy.transport_sockets.tls"
T = "type.googleapis.com/envoy.extensions."
ACCESS_LOG_FORMAT = ("[%START_TIME%] %REQ(:PATH)% http=%RESPONSE_CODE% grpc=%GRPC_STATUS% flags=%RESPONSE_FLAGS% "
                     "peer=%DOWNSTREAM_PEER_URI_SAN% upstream=%UPSTREAM_CLUSTER% %DURATION%ms\n")


def grpc_services() -> dict[str, str]:
    try:
        from tg_tinker.services import GRPC_SERVICES
    except ImportError:
        sys.exit("render.py needs the tensafe package (tg_tinker.services names the gRPC services): "
                 "run it with the Python that has tensafe installed")
    return dict(GRPC_SERVICES)


class Policy:
    def __init__(self, data: dict[str, Any]) -> None:
        self.trust_domain: str = data["trust_domain"]
        self.namespace: str = data["namespace"]
        self.services: list[str] = list(data["services"])
        self.callers: dict[str, list[str]] = {k: list(v or []) for k, v in data["callers"].items()}
        known = set(self.services)
        for caller, callees in self.callers.items():
            if unknown := set(callees) - known:
                raise ValueError(f"policy: {caller} may call {sorted(unknown)}, which are not services")
        if missing := known - set(self.callers):
            raise ValueError(f"policy: services {sorted(missing)} have no callers entry (use [] for none)")

    @classmethod
    def load(cls, path: Path) -> Policy:
        return cls(yaml.safe_load(path.read_text()))

    def spiffe(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{name}"

    def allowed_callers(self, service: str) -> list[str]:
        return [c for c, callees in self.callers.items() if service in callees]

    def peers(self, service: str) -> list[str]:
        """The services ``service`` calls through its sidecar (its own ledger audit goes to itself)."""
        return [p for p in self.callers.get(service, []) if p != service]


def default_ports(policy: Policy, base: int) -> dict[str, Any]:
    services: dict[str, Any] = {}
    for i, name in enumerate(policy.services):
        at = base + 10 * (i + 1)
        services[name] = {"app": at, "inbound": at + 1, "admin": at + 9,
                          "outbound": {p: at + 2 + policy.services.index(p) for p in policy.peers(name)}}
    return {"edge": {"listen": base, "tls": base + 1, "admin": base + 9}, "services": services}


# -- building blocks ------------------------------------------------------------------------------------------
def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cert(certs: Path, name: str) -> dict[str, Any]:
    return {"certificate_chain": {"filename": str(certs / f"{name}.pem")},
            "private_key": {"filename": str(certs / f"{name}.key")}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _h2_cluster(name: str, host: str, port: int, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC" if _is_ip(host) else "STRICT_DNS", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "connection_keepalive": {"interval": "30s", "timeout": "10s"}}}}},
    }
    if tls is not None:
        cluster["transport_socket"] = {"name": TLS_SOCKET, "typed_config": tls}
    return cluster


def _upstream_mtls(policy: Policy, certs: Path, me: str, peer: str) -> dict[str, Any]:
    """Present ``me``'s certificate; accept only a server whose SPIFFE id is ``peer``'s."""
    return {"@type": T + "transport_sockets.tls.v3.UpstreamTlsContext", "sni": peer,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [_cert(certs, me)],
                "validation_context": {
                    "trusted_ca": {"filename": str(certs / "ca.pem")},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": policy.spiffe(peer)}}]}}}


def _downstream_tls(policy: Policy, certs: Path, me: str, *, require_client: bool) -> dict[str, Any]:
    common: dict[str, Any] = {"alpn_protocols": ["h2"],
                              "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                              "tls_certificates": [_cert(certs, me)]}
    ctx: dict[str, Any] = {"@type": T + "transport_sockets.tls.v3.DownstreamTlsContext", "common_tls_context": common}
    if require_client:
        ctx["require_client_certificate"] = True
        # Chains to the mesh CA, and is a SPIFFE id of this trust domain; which one may call is RBAC's part.
        common["validation_context"] = {
            "trusted_ca": {"filename": str(certs / "ca.pem")},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": f"spiffe://{policy.trust_domain}/"}}]}
    return ctx


def _route(match: dict[str, Any], cluster: str) -> dict[str, Any]:
    # timeout 0s: no route timeout (streams last long); the client's grpc-timeout is the deadline.
    return {"match": match, "route": {"cluster": cluster, "timeout": "0s",
                                      "max_stream_duration": {"grpc_timeout_header_max": "0s"}}}


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": T + "filters.http.router.v3.Router"}}


def _hcm(stat_prefix: str, routes: list[dict[str, Any]], http_filters: list[dict[str, Any]],
         **extra: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix, "codec_type": "HTTP2",
        "stream_idle_timeout": "0s", "request_timeout": "0s",
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": T + "access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}],
        "route_config": {"name": stat_prefix, "virtual_hosts": [{"name": stat_prefix, "domains": ["*"],
                                                                 "routes": routes}]},
        "http_filters": [*http_filters, _router()], **extra}}


def _listener(name: str, host: str, port: int, hcm: dict[str, Any], tls: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [hcm]}
    if tls is not None:
        chain["transport_socket"] = {"name": TLS_SOCKET, "typed_config": tls}
    return {"name": name, "address": _address(host, port), "filter_chains": [chain]}


def _bootstrap(node: str, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]],
               admin_port: int | None, host: str) -> dict[str, Any]:
    out: dict[str, Any] = {"node": {"id": node, "cluster": "tensafe-mesh"},
                           "static_resources": {"listeners": listeners, "clusters": clusters}}
    if admin_port:
        out["admin"] = {"address": _address(host, admin_port)}
    return out


# -- the two kinds of proxy -----------------------------------------------------------------------------------
def _address_of(ports: dict[str, Any], service: str, host: str) -> str:
    """Where the others reach ``service``'s inbound listener: its ``address`` in the ports, else ``host``."""
    return ports["services"][service].get("address", host)


def sidecar(policy: Policy, certs: Path, service: str, ports: dict[str, Any], host: str, admin: bool,
            listen: str | None = None) -> dict[str, Any]:
    mine = ports["services"][service]
    callers = policy.allowed_callers(service)
    rbac = {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": T + "filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": {f"callers-of-{service}": {
            "permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"exact": policy.spiffe(c)}}} for c in callers],
        }}} if callers else {"action": "ALLOW", "policies": {}}}}
    inbound = _listener(
        "inbound", listen or host, mine["inbound"],
        _hcm(f"inbound_{service}", [_route({"prefix": "/"}, "local_app")], [rbac],
             forward_client_cert_details="SANITIZE_SET", set_current_client_cert_details={"uri": True}),
        _downstream_tls(policy, certs, service, require_client=True))
    listeners = [inbound]
    clusters = [_h2_cluster("local_app", "127.0.0.1", mine["app"])]
    for peer in policy.peers(service):
        listeners.append(_listener(f"outbound_{peer}", "127.0.0.1", mine["outbound"][peer],
                                   _hcm(f"outbound_{peer}", [_route({"prefix": "/"}, f"peer_{peer}")], [])))
        clusters.append(_h2_cluster(f"peer_{peer}", _address_of(ports, peer, host), ports["services"][peer]["inbound"],
                                    _upstream_mtls(policy, certs, service, peer)))
    return _bootstrap(f"{service}-sidecar", listeners, clusters, mine.get("admin") if admin else None, host)


def edge(policy: Policy, certs: Path, ports: dict[str, Any], host: str, admin: bool,
         names: dict[str, str], listen: str | None = None) -> dict[str, Any]:
    routes: list[dict[str, Any]] = []
    health = {"prefix": "/grpc.health.v1.Health/"}
    for svc in policy.services:
        routes.append(_route({**health, "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": svc}}]},
                             f"svc_{svc}"))
    routes.append(_route(health, "svc_ledger" if "ledger" in policy.services else f"svc_{policy.services[0]}"))
    for svc in policy.services:
        for version in ("v1", "v1alpha"):
            routes.append(_route({"prefix": f"/grpc.reflection.{version}.ServerReflection/",
                                  "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": svc}}]},
                                 f"svc_{svc}"))
        routes.append(_route({"prefix": f"/tensafe.api.{svc}.v1.{names[svc]}/"}, f"svc_{svc}"))
    lua_source = HEALTH_LUA.read_text().replace(
        "local SERVICES = {}  -- @SERVICES@",
        "local SERVICES = {" + ", ".join(f"{s} = true" for s in policy.services) + "}")
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": T + "filters.http.lua.v3.Lua", "default_source_code": {"inline_string": lua_source}}}
    edge_ports = ports["edge"]
    listeners = [_listener("edge", listen or host, edge_ports["listen"], _hcm("edge", routes, [lua]))]
    if edge_ports.get("tls"):
        listeners.append(_listener("edge_tls", listen or host, edge_ports["tls"], _hcm("edge_tls", routes, [lua]),
                                   _downstream_tls(policy, certs, "edge", require_client=False)))
    clusters = [_h2_cluster(f"svc_{svc}", _address_of(ports, svc, host), ports["services"][svc]["inbound"],
                            _upstream_mtls(policy, certs, "edge", svc)) for svc in policy.services]
    return _bootstrap("edge", listeners, clusters, edge_ports.get("admin") if admin else None, host)


def service_env(policy: Policy, service: str, ports: dict[str, Any]) -> str:
    mine = ports["services"][service]
    lines = ["# written by deploy/mesh/render.py: the service listens on loopback behind its sidecar,",
             "# and reaches each peer through the sidecar's outbound listener.",
             "TENSAFE_HOST=127.0.0.1", f"TENSAFE_PORT={mine['app']}"]
    lines += [f"TENSAFE_{p.upper()}_ENDPOINT=127.0.0.1:{mine['outbound'][p]}" for p in policy.peers(service)]
    return "\n".join(lines) + "\n"


def render(policy: Policy, certs: Path, out: Path, ports: dict[str, Any], host: str = "127.0.0.1",
           admin: bool = False, listen: str | None = None) -> list[Path]:
    names = grpc_services()
    if set(policy.services) != set(names):
        raise ValueError(f"policy services {sorted(policy.services)} differ from tensafe's {sorted(names)}")
    out.mkdir(parents=True, exist_ok=True)
    certs = certs.resolve()
    written = []

    def dump(name: str, text: str) -> None:
        path = out / name
        path.write_text(text)
        written.append(path)

    header = "# Generated by deploy/mesh/render.py from deploy/mesh/policy.yaml; edit those, not this file.\n"
    dump("envoy-edge.yaml", header + yaml.safe_dump(edge(policy, certs, ports, host, admin, names, listen),
                                                           sort_keys=False))
    for svc in policy.services:
        dump(f"envoy-{svc}.yaml",
             header + yaml.safe_dump(sidecar(policy, certs, svc, ports, host, admin, listen), sort_keys=False))
        dump(f"{svc}.env", service_env(policy, svc, ports))
    dump("ports.json", json.dumps(ports, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, required=True, help="what scripts/mesh_certs.py wrote")
    parser.add_argument("--out", type=Path, required=True, help="where to write the configs")
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ports", type=Path, help="a ports.json naming every port")
    group.add_argument("--base-port", type=int, default=15000, help="lay the ports out from here (default 15000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="IP the edge, admin and inbound listeners bind (unless --listen), and where a "
                             "service's inbound listener is reached unless ports.json gives its `address`")
    parser.add_argument("--listen", help="bind the inbound and edge listeners here instead (0.0.0.0 in a container)")
    parser.add_argument("--admin", action="store_true", help="enable each Envoy's admin interface on --host")
    args = parser.parse_args(argv)
    policy = Policy.load(args.policy)
    ports = json.loads(args.ports.read_text()) if args.ports else default_ports(policy, args.base_port)
    for path in render(policy, args.certs, args.out, ports, args.host, args.admin, args.listen):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
