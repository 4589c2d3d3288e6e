"""Serve several deltas of one base behind an OpenAI-compatible API and query it with the `openai` client.

Run: python examples/serve_many.py   (micro zoo; no network; needs `pip install 'hf_delta[serving]'`)
     python examples/serve_many.py --logprobs   also: log-probabilities, echo (prompt scoring, as lm-eval
     does it), n choices, penalties, logit_bias, and what a refused parameter answers

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

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--logprobs", action="store_true", help="also show the OpenAI parameters beyond sampling")
args = parser.parse_args()

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

        if args.logprobs:
            # Each generated token's log-probability and its 3 most likely alternatives.
            out = client.completions.create(model="arith", prompt="add 1 to 1 2 3 4 =", max_tokens=4, temperature=0,
                                            logprobs=3)
            lp = out.choices[0].logprobs
            for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
                print(f"{token!r:>8} {logprob:7.3f}  top: {top}")
            # Score a prompt without generating (lm-eval's local-completions): echo, logprobs, max_tokens=0.
            scored = client.completions.create(model="arith", prompt="add 1 to 1 2 3 4 = 2 3 4 5", echo=True,
                                               logprobs=1, max_tokens=0).choices[0].logprobs
            print("prompt log-likelihood:", sum(x for x in scored.token_logprobs if x is not None))
            # Chat: three sampled choices in one request, penalised repetition, one token banned.
            chat = client.chat.completions.create(
                model="chat", messages=messages, max_tokens=8, temperature=0.8, seed=1, n=3, frequency_penalty=1.0,
                presence_penalty=0.5, logit_bias={"0": -100}, logprobs=True, top_logprobs=2,
                extra_body={"repetition_penalty": 1.2, "min_tokens": 2})
            for choice in chat.choices:
                logprobs = [round(t.logprob, 3) for t in choice.logprobs.content]
                print(choice.index, repr(choice.message.content), logprobs)
            try:  # never accepted and ignored: a parameter the server cannot honour is a 400 naming it
                client.chat.completions.create(model="chat", messages=messages, response_format={"type": "json_object"})
            except openai.BadRequestError as err:
                print("400:", err.message)
    engine.close()
