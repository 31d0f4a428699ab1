"""Ask the Kubernetes API, from inside a pod, how many replicas a StatefulSet should have now.

What the queue pods' preStop hook needs (`mtacluster shard drain N --wait --if-scaled-in STATEFULSET`, Helm
chart): a pod is stopped for many reasons (a rolling update, an eviction, a node drain), and only when the
StatefulSet's desired replicas no longer include the pod's ordinal is the shard going away for good, so that
its queue must be handed to the others first. Kubernetes tells a preStop hook nothing about the reason; the
StatefulSet's `spec.replicas` does (the controller removes the highest ordinals first).

`desired_replicas(name)`: GET /apis/apps/v1/namespaces/NS/statefulsets/NAME with the pod's service-account
token, verified against the cluster CA (both in SERVICE_ACCOUNT, the namespace too), at the API server named
by KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT (kubernetes.default.svc:443 without them).
Failure modes: no token or namespace file, no answer, a refusal (403: the Role is missing) or an answer
without spec.replicas raise KubeError with the reason; nothing is retried.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT = 10.0


class KubeError(Exception):
    """The API could not tell (the message says why)."""


def desired_replicas(name: str, account: Path | None = None, timeout: float = TIMEOUT) -> int:
    account = account or SERVICE_ACCOUNT
    try:
        token = (account / "token").read_text().strip()
        namespace = (account / "namespace").read_text().strip()
    except OSError as exc:
        raise KubeError(f"no service-account token in {account} ({exc.strerror}): is it mounted?") from None
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    url = f"https://{host}:{port}/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}"
    try:
        context = ssl.create_default_context(cafile=str(account / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise KubeError(f"cannot read the cluster CA {account / 'ca.crt'}: {exc}") from None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}",
                                                   "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise KubeError(f"the API answered {exc.code} for statefulset {namespace}/{name}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise KubeError(f"cannot read statefulset {namespace}/{name} from {url}: {exc}") from None
    replicas = body.get("spec", {}).get("replicas") if isinstance(body, dict) else None
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise KubeError(f"statefulset {namespace}/{name} has no spec.replicas in the API's answer")
    return replicas
