"""Run a workflow through a real ComfyUI core's node loader and executor (a subprocess of tests/services/test_serve.py).

argv: COMFYUI_DIR NODE_PACKAGE_DIR INPUT_DIR OUT_DIR WORKFLOW_JSON. Loads the node package with ComfyUI's own
``nodes.load_custom_node``, validates the workflow with ``execution.validate_prompt`` and runs it with
``execution.PromptExecutor``, then prints one JSON line: the node's registration, the executor's messages
(errors as ComfyUI shows them), progress-bar updates and the images SaveImage wrote.
"""

import asyncio
import json
import os
import sys

comfy_dir, package_dir, input_dir, out_dir, workflow = sys.argv[1:6]
sys.path.insert(0, comfy_dir)
os.chdir(comfy_dir)
sys.argv = ["main.py", "--cpu"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.utils  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402

folder_paths.set_input_directory(input_dir)
folder_paths.set_output_directory(out_dir)
progress = []
comfy.utils.set_progress_bar_global_hook(
    lambda value, total, preview=None, node_id=None: progress.append([value, total]))


class Server:
    """What PromptExecutor needs of ComfyUI's PromptServer: a client id and somewhere to send messages."""

    client_id = "test"
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append([event, {k: v for k, v in data.items() if k in ("node_type", "exception_message",
                                                                             "exception_type", "value", "max")}])

    def queue_updated(self):
        pass


async def main():
    loaded = await nodes.load_custom_node(package_dir)
    prompt = json.loads(workflow)
    valid = await execution.validate_prompt("1", prompt, None)
    report = {"loaded": bool(loaded) is not False, "registered": "CupscaleUpscale" in nodes.NODE_CLASS_MAPPINGS,
              "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get("CupscaleUpscale"), "valid": bool(valid[0])}
    if not valid[0]:
        report["validation"] = [valid[1], valid[3]]
    else:
        server = Server()
        from comfy.cli_args import args  # what ComfyUI's main.py passes (prompt_worker)

        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": args.cache_lru, "ram": args.cache_ram})
        await executor.execute_async(prompt, "1", {"client_id": "test"}, valid[2])
        report.update(success=executor.success, messages=[m for m in server.messages if m[0].startswith("execution")])
    report["progress"] = progress
    report["saved"] = sorted(os.listdir(out_dir))
    print("REPORT " + json.dumps(report))


asyncio.run(main())
