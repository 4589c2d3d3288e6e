"""Two engine replicas on Ray Serve (a local Ray instance), requests routed to the replica that holds their delta.

Run: python examples/ray_serve.py   (micro zoo; no network; needs `pip install 'hf_delta[ray,serving]'`)

The same from the command line (see docs/ray.md):
    hf-delta serve --ray --replicas 2 --base <base> --delta arith=<folder or hub id> --delta cipher=<...>
"""

import argparse
import tempfile

import openai
import ray
from ray import serve

from hf_delta import BitDeltaConfig, compress
from hf_delta.serving import EngineConfig
from hf_delta.serving.ray import APP_NAME, build_app, start_ray
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

zoo = build_zoo("micro")
base = zoo["llama-base"].path
with tempfile.TemporaryDirectory() as tmp:
    deltas = {}
    for name in ("llama-arith", "llama-cipher", "llama-facts", "llama-chat"):
        compress(base, zoo[name].path, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(f"{tmp}/{name}")
        deltas[name.removeprefix("llama-")] = f"{tmp}/{name}"

    start_ray(num_cpus=4, port=8000)  # or start_ray(address="auto") to join a cluster started with `ray start`
    serve.run(build_app(base=base, deltas=deltas, replicas=2, config=EngineConfig(device_slots=2, cpu_slots=2)),
              name=APP_NAME, route_prefix="/")
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

    # The first request of a delta places it on a replica; later ones go where it is already resident.
    for round_ in range(2):
        for model in deltas:
            raw = client.completions.with_raw_response.create(model=model, prompt="add 1 to 1 2 3 4 =",
                                                              max_tokens=8, temperature=0)
            print(round_, model, "replica", raw.headers["x-hf-delta-replica"],
                  raw.headers["x-hf-delta-residency"], repr(raw.parse().choices[0].text))

    for replica in client.get("/stats", cast_to=object)["replicas"].values():
        print(replica["replica"], "holds", replica["resident"], "hits", replica["hits"], "misses", replica["misses"])
    try:
        client.completions.create(model="nope", prompt="hi")
    except openai.NotFoundError as err:
        print("404:", err.message)
    serve.shutdown()
    ray.shutdown()
