"""Helm's own Go SDK (v4, through helm-python-sdk) for tests/helm.rs: one command per call, its
answer as JSON on stdout, and Helm's error as one line on stderr with exit status 1.

  lint    CHART VALUES_JSON NAMESPACE
  render  CHART VALUES_JSON NAMESPACE       {template path: rendered text}
  package CHART DESTINATION                 {"path": the .tgz}
  push    TGZ REMOTE                        what Helm's registry client answered
  pull    REF VERSION DESTINATION           what Helm's registry client answered
"""
import json
import sys

import helm_python as h


def main(args):
    h.disable_logging()
    command, rest = args[0], args[1:]
    if command == "lint":
        chart, values, namespace = rest
        return h.lint(chart, json.loads(values), strict=True, namespace=namespace)
    if command == "render":
        chart, values, namespace = rest
        return h.Chart.load(chart).render(
            json.loads(values), name="image-mirror-webhook", namespace=namespace, is_install=True
        )
    if command == "package":
        chart, destination = rest
        return {"path": h.package(chart, destination=destination)}
    if command == "push":
        tgz, remote = rest
        return h.push(tgz, remote, plain_http=True)
    if command == "pull":
        ref, version, destination = rest
        return h.pull(ref, version=version, destination=destination, plain_http=True)
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv[1:]), default=str))
    except h.HelmError as e:
        said = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{type(e).__name__}: {said}", file=sys.stderr)
        sys.exit(1)
