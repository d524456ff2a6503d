"""The rendered objects fit together: selectors find their pods, env vars name real settings, GPUs,
Redis, TLS and the network policy are wired the way each value set asks."""

from __future__ import annotations

import base64
import os
import re
import subprocess

import pytest
from pydantic import BaseModel

from deploy_kit import all_pod_templates, env_of, pod_templates, render, selector_matches
from sinkserve.config import Settings

# Kubernetes resource.Quantity syntax (the pattern the KubeRay CRD carries).
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def _pods(rendered):
    return {label: tpl for label, tpl in all_pod_templates(rendered)}


def _labels_of_pods(rendered):
    return [tpl["metadata"]["labels"] for tpl in _pods(rendered).values()]


def test_every_selector_finds_its_pods(rendered):
    for svc in rendered.of_kind("Service"):
        matched = [lbl for lbl in _labels_of_pods(rendered) if selector_matches(svc["spec"]["selector"], lbl)]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} pod templates"
    for kind in ("Deployment", "StatefulSet"):
        for obj in rendered.of_kind(kind):
            assert selector_matches(obj["spec"]["selector"]["matchLabels"], obj["spec"]["template"]["metadata"]["labels"])
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        gateway = rendered.named("Deployment", f"{rendered.fullname}-gateway")
        assert selector_matches(pdb["spec"]["selector"]["matchLabels"], gateway["spec"]["template"]["metadata"]["labels"])
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        deployment = rendered.named(target["kind"], target["name"])
        assert "replicas" not in deployment["spec"], "an HPA-managed Deployment must not pin replicas"


def test_service_ports_reach_named_container_ports(rendered):
    for svc in rendered.of_kind("Service"):
        (pod,) = [t for t in _pods(rendered).values() if selector_matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)


def test_quantities_are_valid(rendered):
    for label, tpl in _pods(rendered).items():
        for container in tpl["spec"]["containers"]:
            for section in ("requests", "limits"):
                for resource, amount in container.get("resources", {}).get(section, {}).items():
                    assert QUANTITY.match(str(amount)), f"{label}: {resource}={amount!r}"
    for sts in rendered.of_kind("StatefulSet"):
        for claim in sts["spec"]["volumeClaimTemplates"]:
            assert QUANTITY.match(str(claim["spec"]["resources"]["requests"]["storage"]))


def _setting_exists(env_name: str) -> bool:
    # SINKSERVE_<SECTION>__<FIELD> -> Settings.<section>.<field>
    path = env_name.removeprefix("SINKSERVE_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_sinkserve_env_vars_name_real_settings(rendered, monkeypatch):
    for label, tpl in _pods(rendered).items():
        for container in tpl["spec"]["containers"]:
            env = env_of(container)
            ours = {name: e for name, e in env.items() if name.startswith("SINKSERVE_")}
            for name in ours:
                assert _setting_exists(name), f"{label}: {name} is not a field of sinkserve.config.Settings"
            # And the literal values load: what the pod would see at start.
            for name in list(os.environ):
                if name.startswith("SINKSERVE_"):
                    monkeypatch.delenv(name)
            for name, e in ours.items():
                monkeypatch.setenv(name, e.get("value", "from-a-secret"))
            Settings()


def test_gateway_is_wired_to_ray_and_redis(rendered):
    fullname = rendered.fullname
    gateway = rendered.named("Deployment", f"{fullname}-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    # The pod joins the Ray cluster as a resource-less node, then runs the gateway as a driver on it.
    assert container["command"] == ["tini", "--", "bash", "-c"]
    (script,) = container["args"]
    assert "ray start" in script and "--num-cpus=0 --num-gpus=0" in script
    assert script.rstrip().endswith("exec sinkserve gateway")
    env = env_of(container)
    # KubeRay's stable head Service of a RayService is "<name>-head-svc"; the GCS listens on 6379.
    assert env["RAY_HEAD_ADDRESS"]["value"] == f"{fullname}-head-svc:6379"
    assert env["SINKSERVE_RAY__ADDRESS"]["value"] == "auto"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["SINKSERVE_GATEWAY__HOST"]["value"] == "0.0.0.0"
    assert int(env["SINKSERVE_GATEWAY__PORT"]["value"]) == container["ports"][0]["containerPort"]
    secret_ref = env["SINKSERVE_REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"]
    redis_auth = rendered.values["redis"]["auth"]
    assert secret_ref["key"] == redis_auth["passwordKey"]
    if rendered.values["redis"]["mode"] == "bundled" and not redis_auth["existingSecret"]:
        secret = rendered.named("Secret", secret_ref["name"])
        assert secret_ref["key"] in secret["data"]


def test_gateway_pods_are_hardened(rendered):
    pod = rendered.named("Deployment", f"{rendered.fullname}-gateway")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    for label, tpl in _pods(rendered).items():
        assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True, label
        assert tpl["spec"]["automountServiceAccountToken"] is False, label


def test_gateway_probes_use_grpc_health_without_tls(renders):
    rendered = renders["gpu-default"]
    (container,) = rendered.named("Deployment", f"{rendered.fullname}-gateway")["spec"]["template"]["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}
    svc = rendered.named("Service", f"{rendered.fullname}-gateway")
    assert svc["spec"]["ports"][0]["appProtocol"] == "grpc"


def test_tls_mounts_the_secret_and_probes_the_port(renders):
    rendered = renders["tls"]
    pod = rendered.named("Deployment", f"{rendered.fullname}-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    mount = {m["name"]: m for m in container["volumeMounts"]}["tls"]
    assert env["SINKSERVE_GATEWAY__TLS_CERT_FILE"]["value"] == f"{mount['mountPath']}/tls.crt"
    assert env["SINKSERVE_GATEWAY__TLS_KEY_FILE"]["value"] == f"{mount['mountPath']}/tls.key"
    volume = {v["name"]: v for v in pod["volumes"]}["tls"]
    assert volume["secret"]["secretName"] == "sinkserve-gateway-tls"
    # The kubelet's gRPC probe cannot do TLS: it would fail every probe against a TLS port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe] and container[probe]["tcpSocket"] == {"port": "grpc"}
    ingress = rendered.one("Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert ingress["spec"]["tls"] == [{"hosts": ["chat.example.com"], "secretName": "sinkserve-ingress-tls"}]


def test_gpu_workers_request_gpus_and_tolerate_the_gpu_taint(renders):
    cluster = renders["gpu-default"].one("RayService")["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert group["rayStartParams"]["num-gpus"] == str(resources["limits"]["nvidia.com/gpu"])
    head_resources = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_resources.get("limits", {})


def test_two_node_example_places_one_worker_pod_per_node(renders):
    rendered = renders["two-nodes-eight-gpus"]
    (group,) = rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    anti = group["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert selector_matches(anti[0]["labelSelector"]["matchLabels"], group["template"]["metadata"]["labels"])
    (app,) = rendered.serve_config["applications"]
    assert app["deployments"][0]["num_replicas"] * app["deployments"][0]["ray_actor_options"]["num_gpus"] == 8


def test_cpu_only_asks_for_no_gpu_anywhere(renders):
    rendered = renders["cpu-only"]
    text = repr(rendered.objects)
    assert "nvidia.com/gpu" not in text
    for group in rendered.one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["rayStartParams"]["num-gpus"] == "0"
    (app,) = rendered.serve_config["applications"]
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    assert app["args"]["engine"]["device"] == "cpu"
    assert rendered.one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "image"
    ].endswith("-cpu")


def test_gcs_fault_tolerance_uses_redis_and_its_secret(rendered):
    options = rendered.one("RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis = rendered.values["redis"]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == redis["auth"]["passwordKey"]
    if redis["mode"] == "bundled":
        svc = rendered.named("Service", f"{rendered.fullname}-redis")
        assert options["redisAddress"] == f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    else:
        ext = redis["external"]
        assert options["redisAddress"] == f"{'rediss://' if ext['tls'] else ''}{ext['host']}:{ext['port']}"
        assert ref["name"] == redis["auth"]["existingSecret"]


def test_bundled_redis_persists_with_aof_and_a_password(renders):
    rendered = renders["gpu-default"]
    sts = rendered.one("StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["command"])
    assert "--appendonly yes" in script and "requirepass" in script
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == f"{rendered.fullname}-redis"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert claim["metadata"]["name"] == "data"
    secret = rendered.named("Secret", f"{rendered.fullname}-redis")
    assert len(secret["data"]["redis-password"]) > 0


def test_external_redis_deploys_no_redis_of_its_own(renders):
    rendered = renders["external-redis"]
    assert not rendered.of_kind("StatefulSet")
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == [f"{rendered.fullname}-ray-auth"]
    assert not rendered.of_kind("NetworkPolicy")
    (app,) = rendered.serve_config["applications"]
    assert app["args"]["redis"]["url"] == "rediss://sinkserve.abc123.cache.example.internal:6380/2"


def test_only_gateway_and_ray_pods_may_reach_redis(renders):
    rendered = renders["gpu-default"]
    policy = rendered.one("NetworkPolicy")
    pods = _pods(rendered)
    protected = [label for label, t in pods.items() if selector_matches(policy["spec"]["podSelector"]["matchLabels"], t["metadata"]["labels"])]
    assert protected == [f"StatefulSet/{rendered.fullname}-redis"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = sorted(label for label, t in pods.items() if selector_matches(peer["podSelector"]["matchLabels"], t["metadata"]["labels"]))
    assert allowed == sorted(["ray-head", "ray-worker/gpu", f"Deployment/{rendered.fullname}-gateway"])
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_notes_tell_how_to_create_a_tenant_and_connect(rendered):
    assert f"kubectl -n llm exec deploy/{rendered.fullname}-gateway -- sinkserve tenant create NAME --no-save" in rendered.notes
    assert "authorization: Bearer" in rendered.notes


@pytest.mark.parametrize("value_set_name", ["gpu-default", "tls"])
def test_release_password_is_not_rendered_in_plain_text(renders, value_set_name):
    rendered = renders[value_set_name]
    secret = rendered.named("Secret", f"{rendered.fullname}-redis")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    others = [o for o in rendered.objects if o is not secret]
    assert password not in repr(others)


def test_gateway_start_script_is_valid_bash(renders, tmp_path):
    rendered = renders["gpu-default"]
    (container,) = rendered.named("Deployment", f"{rendered.fullname}-gateway")["spec"]["template"]["spec"]["containers"]
    script = tmp_path / "gateway.sh"
    script.write_text(container["args"][0])
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ray_token_auth_reaches_kuberay_and_the_gateway(rendered):
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    secret_name = f"{rendered.fullname}-ray-auth"
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret_name}
    # KubeRay expects the token under auth_token.
    assert base64.b64decode(rendered.named("Secret", secret_name)["data"]["auth_token"])
    (container,) = rendered.named("Deployment", f"{rendered.fullname}-gateway")["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": "auth_token"}


def test_ray_auth_can_use_an_existing_secret_or_be_off(chart):
    existing = render(chart, {"ray": {"auth": {"existingSecret": "team-ray-token"}}})
    assert existing.one("RayService")["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "team-ray-token"
    assert not [s for s in existing.of_kind("Secret") if s["metadata"]["name"].endswith("-ray-auth")]
    off = render(chart, {"ray": {"auth": {"enabled": False}}})
    assert "authOptions" not in off.one("RayService")["spec"]["rayClusterConfig"]
    (container,) = off.named("Deployment", f"{off.fullname}-gateway")["spec"]["template"]["spec"]["containers"]
    assert "RAY_AUTH_TOKEN" not in env_of(container)
