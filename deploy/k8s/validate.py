#!/usr/bin/env python3
"""Offline checks of a rendered overlay (`kubectl kustomize deploy/k8s/examples/<name>`, or the Helm post-renderer's output).

Usage: validate.py RENDERED.yaml OUTDIR
       validate.py --help

Writes into OUTDIR:
  core.yaml     the core Kubernetes objects, for `kubernetes-validate --strict`
  rules.yml     spec.groups of every PrometheusRule, for `promtool check rules`
  sidecar.json  what the manifests hand to ear-sidecar (args, env names, config TOML, probes,
                ports), for the CLI-agreement test in tests/deploy.rs
  monitoring.json  the scrape job name each ServiceMonitor gives its targets and the job
                selectors of the PrometheusRule's expressions
and checks here, exiting 1 with one line per problem:
  - CRD objects (ServiceMonitor, PrometheusRule) structurally: apiVersion/kind/metadata.name,
    required fields and types, no unknown fields in the parts we use;
  - references inside the bundle: ConfigMaps/keys used by env and volumes exist, Service selectors
    match the pod labels and name existing container ports, the ServiceMonitor selects the metrics
    Service by labels and port name;
  - the native-sidecar layout: ear-sidecar is an init container with restartPolicy Always and the
    restrictive securityContext (all capabilities dropped but IPC_LOCK and SYS_RESOURCE), the
    attach step uses Bidirectional propagation and the tserver HostToContainer on the same volume;
  - the job name: prometheus-operator names a ServiceMonitor's job after the Service, or after
    the value of the Service label named by spec.jobLabel; every job="..." / job=~"..."
    selector in the PrometheusRule must match that job (else e.g. EarSidecarDown never fires).
Needs PyYAML (a dependency of kubernetes-validate).
"""
import json
import os
import re
import sys

import yaml

errors = []


def err(msg):
    errors.append(msg)


def name_of(obj):
    return "%s/%s" % (obj.get("kind"), (obj.get("metadata") or {}).get("name"))


def check_keys(where, d, allowed, required=()):
    if not isinstance(d, dict):
        err("%s: expected a mapping, got %r" % (where, type(d).__name__))
        return False
    for k in d:
        if k not in allowed:
            err("%s: unknown field %r" % (where, k))
    for k in required:
        if k not in d:
            err("%s: missing required field %r" % (where, k))
    return True


def is_str_map(v):
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def check_metadata(obj):
    md = obj.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str) or not md["name"]:
        err("%s: metadata.name missing" % name_of(obj))
        return
    for f in ("labels", "annotations"):
        if f in md and not is_str_map(md[f]):
            err("%s: metadata.%s must map strings to strings" % (name_of(obj), f))


SM_ENDPOINT_KEYS = {
    "port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
    "honorTimestamps", "relabelings", "metricRelabelings", "params", "tlsConfig", "bearerTokenSecret",
    "authorization", "basicAuth", "oauth2", "followRedirects", "enableHttp2", "proxyUrl",
    "filterRunning", "trackTimestampsStaleness",
}
RELABEL_KEYS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}


def check_servicemonitor(obj):
    n = name_of(obj)
    check_keys(n, obj, {"apiVersion", "kind", "metadata", "spec"}, ("spec",))
    spec = obj.get("spec") or {}
    check_keys(n + ".spec", spec,
               {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                "podTargetLabels", "sampleLimit", "targetLimit", "attachMetadata"},
               ("selector", "endpoints"))
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        err("%s.spec.selector: needs matchLabels or matchExpressions" % n)
    eps = spec.get("endpoints")
    if not isinstance(eps, list) or not eps:
        err("%s.spec.endpoints: must be a non-empty list" % n)
        eps = []
    for i, ep in enumerate(eps):
        w = "%s.spec.endpoints[%d]" % (n, i)
        if not check_keys(w, ep, SM_ENDPOINT_KEYS):
            continue
        if "port" not in ep and "targetPort" not in ep:
            err("%s: needs port or targetPort" % w)
        if "scheme" in ep and ep["scheme"] not in ("http", "https"):
            err("%s.scheme: http or https" % w)
        for f in ("relabelings", "metricRelabelings"):
            for j, r in enumerate(ep.get(f) or []):
                check_keys("%s.%s[%d]" % (w, f, j), r, RELABEL_KEYS)


def check_prometheusrule(obj, groups_out):
    n = name_of(obj)
    check_keys(n, obj, {"apiVersion", "kind", "metadata", "spec"}, ("spec",))
    spec = obj.get("spec") or {}
    check_keys(n + ".spec", spec, {"groups"}, ("groups",))
    groups = spec.get("groups")
    if not isinstance(groups, list):
        err("%s.spec.groups: must be a list" % n)
        return
    for i, g in enumerate(groups):
        w = "%s.spec.groups[%d]" % (n, i)
        if not check_keys(w, g, {"name", "interval", "rules", "partial_response_strategy", "limit",
                                 "query_offset", "labels"}, ("name",)):
            continue
        if not isinstance(g.get("name"), str) or not g["name"]:
            err("%s.name: non-empty string" % w)
        rules = g.get("rules") or []
        if not isinstance(rules, list):
            err("%s.rules: must be a list" % w)
            continue
        for j, r in enumerate(rules):
            rw = "%s.rules[%d]" % (w, j)
            if not check_keys(rw, r, {"record", "alert", "expr", "for", "keep_firing_for", "labels",
                                      "annotations"}, ("expr",)):
                continue
            if ("record" in r) == ("alert" in r):
                err("%s: exactly one of record/alert" % rw)
            if not isinstance(r.get("expr"), (str, int, float)):
                err("%s.expr: must be a string (PromQL)" % rw)
            for f in ("labels", "annotations"):
                if f in r and not is_str_map(r[f]):
                    err("%s.%s: must map strings to strings (quote numbers)" % (rw, f))
        groups_out.append(g)


def main():
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if len(args) != 2:
        print("validate.py: expected RENDERED.yaml OUTDIR, got %d argument(s); see --help" % len(args),
              file=sys.stderr)
        sys.exit(2)
    rendered, outdir = args
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    core, groups = [], []
    by_kind = {}
    for d in docs:
        if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
            err("object without apiVersion/kind: %r" % (d,)[:200])
            continue
        check_metadata(d)
        by_kind.setdefault(d["kind"], []).append(d)
        api = d["apiVersion"]
        if api.startswith("monitoring.coreos.com/"):
            if api != "monitoring.coreos.com/v1":
                err("%s: apiVersion must be monitoring.coreos.com/v1" % name_of(d))
            if d["kind"] == "ServiceMonitor":
                check_servicemonitor(d)
            elif d["kind"] == "PrometheusRule":
                check_prometheusrule(d, groups)
            else:
                err("%s: unexpected prometheus-operator kind" % name_of(d))
        else:
            core.append(d)

    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    services = by_kind.get("Service", [])
    sts = [s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"] == "yb-tserver"]
    if len(sts) != 1:
        err("expected exactly one StatefulSet yb-tserver, found %d" % len(sts))
        finish(outdir, core, groups, None)
        return
    ss = sts[0]
    pod = ss["spec"]["template"]["spec"]
    pod_labels = ss["spec"]["template"]["metadata"].get("labels") or {}
    if not set((ss["spec"]["selector"].get("matchLabels") or {}).items()) <= set(pod_labels.items()):
        err("StatefulSet selector does not match its pod labels")
    claim_names = {c["metadata"]["name"] for c in ss["spec"].get("volumeClaimTemplates") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    inits = {c["name"]: c for c in pod.get("initContainers") or []}
    mains = {c["name"]: c for c in pod.get("containers") or []}
    all_ctrs = list(inits.values()) + list(mains.values())

    # Every configMapKeyRef / configMap volume points at a rendered ConfigMap and key.
    for c in all_ctrs:
        for ef in c.get("envFrom") or []:
            ref = ef.get("configMapRef")
            if ref and ref["name"] not in configmaps and not ref.get("optional"):
                err("container %s envFrom: no ConfigMap %s" % (c["name"], ref["name"]))
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                cm = configmaps.get(ref["name"])
                if cm is None:
                    err("container %s env %s: no ConfigMap %s" % (c["name"], e["name"], ref["name"]))
                elif ref["key"] not in (cm.get("data") or {}):
                    err("container %s env %s: ConfigMap %s has no key %s" % (c["name"], e["name"], ref["name"], ref["key"]))
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes and m["name"] not in claim_names:
                err("container %s mounts unknown volume %s" % (c["name"], m["name"]))
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            err("volume %s: no ConfigMap %s" % (v["name"], v["configMap"]["name"]))

    # Native sidecar layout.
    side = inits.get("ear-sidecar")
    attach = inits.get("ear-attach")
    tserver = mains.get("yb-tserver")
    order = [c["name"] for c in pod.get("initContainers") or []]
    if "ear-sidecar" not in order or "ear-attach" not in order or order.index("ear-sidecar") > order.index("ear-attach"):
        err("init containers must include ear-sidecar, then ear-attach, got %s" % order)
    for c in (side, attach):
        if c is not None and c.get("restartPolicy") != "Always":
            err("init container %s must be a native sidecar (restartPolicy: Always)" % c["name"])
    if side is not None:
        sc = side.get("securityContext") or {}
        want = {"runAsNonRoot": True, "readOnlyRootFilesystem": True}
        for k, v in want.items():
            if sc.get(k) != v:
                err("ear-sidecar securityContext.%s must be %s" % (k, v))
        # PR_SET_IO_FLUSHER needs SYS_RESOURCE, mlockall IPC_LOCK; nothing else.
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or sorted(caps.get("add") or []) != ["IPC_LOCK", "SYS_RESOURCE"]:
            err("ear-sidecar must drop ALL capabilities and add exactly IPC_LOCK and SYS_RESOURCE, got %r" % caps)
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            err("ear-sidecar seccompProfile must be RuntimeDefault")
        if sc.get("privileged"):
            err("ear-sidecar must not be privileged")
        for p in ("livenessProbe", "readinessProbe", "startupProbe"):
            if p not in side:
                err("ear-sidecar has no %s" % p)
        for r in ("requests", "limits"):
            if not (side.get("resources") or {}).get(r):
                err("ear-sidecar has no resources.%s" % r)

    def mount(c, vol):
        for m in (c or {}).get("volumeMounts") or []:
            if m["name"] == vol:
                return m
        return None

    am, tm = mount(attach, "ear-mnt"), mount(tserver, "ear-mnt")
    if not am or am.get("mountPropagation") != "Bidirectional":
        err("ear-attach must mount ear-mnt with mountPropagation Bidirectional")
    if not tm or tm.get("mountPropagation") != "HostToContainer":
        err("yb-tserver must mount ear-mnt with mountPropagation HostToContainer")
    if attach is not None and not (attach.get("securityContext") or {}).get("privileged"):
        err("ear-attach must be privileged (Bidirectional propagation requires it)")
    if attach is not None and "preStop" not in (attach.get("lifecycle") or {}):
        err("ear-attach needs a preStop detach hook")
    if "ear-socket" not in volumes or "emptyDir" not in volumes["ear-socket"]:
        err("the socket volume ear-socket must be an emptyDir")
    if side is None or mount(side, "ear-data") is None or "ear-data" not in claim_names:
        err("ear-sidecar must keep its data on the volumeClaimTemplate ear-data")

    # Services select the pods and name real container ports.
    port_names = {p.get("name") for c in all_ctrs for p in c.get("ports") or []}
    for s in services:
        sel = s["spec"].get("selector") or {}
        if sel and set(sel.items()) <= set(pod_labels.items()):
            for p in s["spec"].get("ports") or []:
                tp = p.get("targetPort", p.get("port"))
                if isinstance(tp, str) and tp not in port_names:
                    err("Service %s port %s: targetPort %s is no container port" % (s["metadata"]["name"], p.get("name"), tp))
    metrics_svcs = [s for s in services if (s["metadata"].get("annotations") or {}).get("prometheus.io/scrape") == "true"]
    if not metrics_svcs:
        err("no Service with prometheus.io/scrape annotations")
    for sm in by_kind.get("ServiceMonitor", []):
        ml = (sm.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
        hits = [s for s in services if set(ml.items()) <= set((s["metadata"].get("labels") or {}).items())]
        if not hits:
            err("ServiceMonitor %s selects no Service" % sm["metadata"]["name"])
        for ep in sm.get("spec", {}).get("endpoints") or []:
            if "port" in ep and not any(ep["port"] == p.get("name") for s in hits for p in s["spec"].get("ports") or []):
                err("ServiceMonitor %s: port %s not on the selected Service" % (sm["metadata"]["name"], ep["port"]))

    check_job_selectors(by_kind, services, groups)

    summary = None
    if side is not None:
        cfg_vol = None
        for m in side.get("volumeMounts") or []:
            v = volumes.get(m["name"]) or {}
            if "configMap" in v:
                cfg_vol = (m["mountPath"], configmaps.get(v["configMap"]["name"]) or {})
        config_files = {}
        if cfg_vol:
            for k, text in (cfg_vol[1].get("data") or {}).items():
                config_files[cfg_vol[0].rstrip("/") + "/" + k] = text
        env = {}
        for ef in side.get("envFrom") or []:
            ref = ef.get("configMapRef")
            if ref:
                for k, v in ((configmaps.get(ref["name"]) or {}).get("data") or {}).items():
                    env[(ef.get("prefix") or "") + k] = v
        for e in side.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                env[e["name"]] = ((configmaps.get(ref["name"]) or {}).get("data") or {}).get(ref["key"]) if ref else None
        probes = {}
        for p in ("livenessProbe", "readinessProbe", "startupProbe"):
            hg = (side.get(p) or {}).get("httpGet") or {}
            probes[p] = {"path": hg.get("path"), "port": hg.get("port")}
        summary = {
            "command": side.get("command"),
            "args": side.get("args"),
            "env": env,
            "config_files": config_files,
            "probes": probes,
            "ports": {p.get("name"): p.get("containerPort") for p in side.get("ports") or []},
            "run_as_user": (side.get("securityContext") or {}).get("runAsUser"),
        }
    finish(outdir, core, groups, summary)


MONITORING = {"jobs": [], "selectors": []}
JOB_MATCHER = re.compile(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"')


def check_job_selectors(by_kind, services, groups):
    """The job names the ServiceMonitors produce, and every rule's job selectors against them."""
    jobs = []
    for sm in by_kind.get("ServiceMonitor", []):
        spec = sm.get("spec") or {}
        ml = (spec.get("selector") or {}).get("matchLabels") or {}
        for s in services:
            labels = s["metadata"].get("labels") or {}
            if not set(ml.items()) <= set(labels.items()):
                continue
            jl = spec.get("jobLabel")
            if jl:
                if jl not in labels:
                    err("ServiceMonitor %s: jobLabel %s is not a label of Service %s" % (sm["metadata"]["name"], jl, s["metadata"]["name"]))
                    continue
                jobs.append(labels[jl])
            else:
                jobs.append(s["metadata"]["name"])
    MONITORING["jobs"] = sorted(set(jobs))
    for g in groups:
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record")
            for op, value in JOB_MATCHER.findall(str(r.get("expr", ""))):
                MONITORING["selectors"].append({"rule": name, "op": op, "value": value})
                if not jobs:
                    continue
                if op == "=":
                    ok = value in jobs
                elif op == "=~":
                    ok = any(re.fullmatch(value, j) for j in jobs)
                elif op == "!=":
                    ok = any(j != value for j in jobs)
                else:
                    ok = any(not re.fullmatch(value, j) for j in jobs)
                if not ok:
                    err("rule %s selects job%s\"%s\" but the ServiceMonitor's job is %s: it can never match"
                        % (name, op, value, " or ".join(jobs)))


def finish(outdir, core, groups, summary):
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "core.yaml"), "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    with open(os.path.join(outdir, "rules.yml"), "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    with open(os.path.join(outdir, "sidecar.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(outdir, "monitoring.json"), "w") as f:
        json.dump(MONITORING, f, indent=2)
    if errors:
        for e in errors:
            print("INVALID: " + e, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
