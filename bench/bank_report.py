"""The Markdown report of ``bench/bank.py`` (its figure table, the search-option table and the machine line).

The first rows are issue 22's targets. The floor row is what no fusion at this size can beat on the
machine: the fused logits are ``Q x H x W`` float32 (131 MiB at 171 x 448 x 448), and a fusion reads
the image's own logits and writes the fused ones at least once (``bench/bank_serve.py`` times one
in-place pass over them after each image's steps).
"""

from __future__ import annotations

GIB = 2**30


def report(res: dict) -> str:
    a, s = res["args"], res["serving"]
    lines = [f"# Memory-bank benchmark: {a['regions']:,} stand-in regions, R = {a['regions_per_image']}, K = {a['k']}, "
             f"nprobe {a['nprobe']}, Q = {a['classes']} classes at {a['size'][0]}x{a['size'][1]}, 1 CPU thread",
             f"index: {res['index']['build']} build, nlist {res['index_nlist']}, {res['index']['bytes'] / 2**20:.0f} MiB on disk",
             "", "| figure | target | measured |", "|---|---|---|"]
    for reader, out in s.items():
        ms, cpu = out["ms"], out["cpu_ms"]
        lines.append(f"| retrieval + fusion per image (reader: {reader}), wall / CPU ms | <= 5 ms | {ms['total']:.1f} / "
                     f"{cpu['total']:.1f}: query pooling {ms['query_pooling']:.1f} / {cpu['query_pooling']:.1f}, search "
                     f"{ms['search']:.1f} / {cpu['search']:.1f}, values + logits + DMCE {ms['values_and_logits']:.1f} / "
                     f"{cpu['values_and_logits']:.1f}, fusion {ms['fusion']:.1f} / {cpu['fusion']:.1f} |")
    floors = [(out["ms"]["logits_pass"], out["cpu_ms"]["logits_pass"]) for out in s.values() if "logits_pass" in out["ms"]]
    if floors:  # the same tensor in every serving process: the lowest median of them
        wall, cpu_floor = min(floors, key=lambda f: f[1])
        lines.append(f"| floor of the fusion alone: one in-place pass over the {a['classes']} x {a['size'][0]} x "
                     f"{a['size'][1]} float32 logits ({4 * a['classes'] * a['size'][0] * a['size'][1] / 2**20:.0f} "
                     f"MiB, read and written), wall / CPU ms | | {wall:.1f} / {cpu_floor:.1f} |")
    for reader, out in s.items():
        mem, start = out["memory"]["served"], out["memory"]["start"]
        lines.append(f"| RSS serving, two value stores, reader: {reader}, after {out['images']} images | <= 1.5 GiB | "
                     f"{mem['VmRSS'] / GIB:.2f} GiB, of which the bank {(mem['VmRSS'] - start['VmRSS']) / GIB:.2f} "
                     f"(anon {(mem['RssAnon'] - start['RssAnon']) / GIB:.2f}, file {(mem['RssFile'] - start['RssFile']) / GIB:.2f}); "
                     f"before the bank (imports, test inputs) {start['VmRSS'] / GIB:.2f} |")
    default = res["options"][0]
    lines.append(f"| recall@{a['k']} of the default index vs exact | printed | {default['recall']:.3f} "
                 f"(search {default['ms_per_image']:.1f} ms wall, {default['cpu_ms_per_image']:.1f} ms CPU per image) |")
    ext = res.get("extension")
    if ext:
        same, new = ext["same_distribution"], ext["new_domain"]
        lines.append(f"| recall after +10 % (same distribution): added / retrained | measured | "
                     f"{same['added_without_retraining']:.3f} / {same['retrained_on_all']:.3f} |")
        lines.append(f"| recall after +10 % new domain, queries on new regions: added / retrained | measured | "
                     f"{new['added_without_retraining']['new_queries']:.3f} / {new['retrained_on_all']['new_queries']:.3f} |")
    lines += ["", "| search option | wall / CPU ms per image | recall@k |", "|---|---|---|"]
    lines += [f"| {o['option']} | {o['ms_per_image']:.1f} / {o['cpu_ms_per_image']:.1f} | "
              + (f"{o['recall']:.3f}" if "recall" in o else "-")
              + ("" if "same_neighbours_as_default" not in o else
                 f" (same neighbours as the default on these images: {o['same_neighbours_as_default']})") + " |"
              for o in res["options"]]
    same = ", ".join(f"{k} {v:.3f}" for k, v in res["bf16_same_lists"].items())
    lines += ["", f"bfloat16 coarse step, fraction of queries probing the float32 step's lists (coarse_refine): {same}",
              f"FastScan index: {res['fastscan_bytes'] / 2**20:.0f} MiB on disk; in-RAM re-ranking codes: "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in res.get("refine_bytes", {}).items()),
              "", f"Machine: {res['machine']}"]
    return "\n".join(lines)
