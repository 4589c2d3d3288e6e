"""Serve several deltas of one base behind an OpenAI-compatible API and query it with the `openai` client.

Run: python examples/serve_many.py   (micro zoo; no network; needs `pip install 'hf_delta[serving]'`)

The same server from the command line:
    hf-delta serve --base <base> --delta arith=<folder or hub id> --delta chat=<...> --api-key secret
"""

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor

import openai

from hf_delta import BitDeltaConfig, compress
from hf_delta.serving import Engine, EngineConfig, SamplingParams, ServerThread, create_app
from hf_delta.zoo import build_zoo

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

zoo = build_zoo("micro")
base = zoo["llama-base"].path
with tempfile.TemporaryDirectory() as tmp:
    deltas = {}
    for name in ("llama-arith", "llama-cipher", "llama-chat"):
        compress(base, zoo[name].path, BitDeltaConfig(distill_steps=0), progress=False).save_pretrained(f"{tmp}/{name}")
        deltas[name.removeprefix("llama-")] = f"{tmp}/{name}"

    # Two device slots for three deltas: the engine loads, evicts and prefetches them as requests come.
    engine = Engine(base, deltas=deltas, config=EngineConfig(device_slots=2, cpu_slots=1))

    # In-process, without HTTP: one call, a mixed batch of deltas.
    for result in engine.generate(["add 1 to 1 2 3 4 =", "encode a b c d ="], model=["arith", "cipher"],
                                  params=SamplingParams(max_tokens=8)):
        print(result.model, repr(result.text), result.finish_reason)

    with ServerThread(create_app(engine, api_key="secret")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="secret")
        print("models:", [m.id for m in client.models.list()])

        # The chat delta brings its own chat template and end-of-turn token; the server uses them.
        messages = [{"role": "user", "content": "first: a b c"}]
        for chunk in client.chat.completions.create(model="chat", messages=messages, max_tokens=8, stream=True):
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()

        # Many concurrent clients over all deltas share every forward pass.
        def ask(i: int) -> str:
            model = ["arith", "cipher", "base"][i % 3]
            return client.completions.create(model=model, prompt=f"add {i % 9} to 1 2 3 4 =", max_tokens=8,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(12) as pool:
            print(list(pool.map(ask, range(12))))
        try:
            client.completions.create(model="nope", prompt="hi")
        except openai.NotFoundError as err:
            print("404:", err.message)
    engine.close()
