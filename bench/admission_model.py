"""A model of the engine's admission on a workload bench run: how CachedAttention's later-turn TTFT
depends on step speed, and what letting small jobs pass a blocked queue head (backfilling) would gain.

A diagnostic, not a benchmark mode. It replays one system's turns from a results JSON (prompt,
cached and generated tokens per turn) through the workload's arrivals and think times: a pool of
pages, FCFS admission with chunk-free prefill, one token per running request per step, and a step
time fitted to the engine on this CPU (35 ms + 4.5 ms per decoder + 0.9 ms per prefilled token +
4 us per context token + 10 us per loaded token), times a scale. Pick the scale whose busy time
matches the run's `compute_s`; the other scales show the slope.

    python bench/admission_model.py [results.json] [workload.json] [system]
"""

import heapq
import json
import statistics
import sys

PAGE, PAGES, MAX_SEQS = 16, 437, 16


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE)


def step_time(decoders: list[dict], admitted: list[dict]) -> float:
    prefill = sum(q["prompt"] - q["cached"] for q in admitted)
    context = sum(q["prompt"] + q["made"] for q in decoders)
    loaded = sum(q["cached"] for q in admitted)
    return 0.035 + 0.0045 * len(decoders) + 0.0009 * prefill + 4e-6 * context + 1e-5 * loaded


def simulate(turns: dict, sessions: list[dict], backfill: bool, scale: float) -> tuple[float, float]:
    """(mean TTFT of turns >= 2, busy seconds)."""
    arrivals = [(s["arrival_s"], i, 0) for i, s in enumerate(sessions)]
    heapq.heapify(arrivals)
    now = busy = 0.0
    waiting: list[dict] = []
    running: list[dict] = []
    free = PAGES
    later: list[float] = []
    while arrivals or waiting or running:
        while arrivals and arrivals[0][0] <= now:
            at, i, k = heapq.heappop(arrivals)
            t = turns[(sessions[i]["session_id"], k)]
            waiting.append({"session": i, "turn": k, "arrival": at, "prompt": t["prompt_tokens"],
                            "cached": sum(t["cached_tokens"].values()), "answer": t["generated_tokens"],
                            "made": 0, "pages": 0})
        if not waiting and not running:
            now = arrivals[0][0]
            continue
        for q in running:  # the next token's page
            grow = pages_for(q["prompt"] + q["made"] + 1) - q["pages"]
            free -= grow
            q["pages"] += grow
        admitted: list[dict] = []

        def admit(q: dict, admitted: list[dict] = admitted) -> bool:
            nonlocal free
            need = pages_for(q["prompt"]) - q["pages"]
            if need > free or len(running) >= MAX_SEQS:
                return False
            free -= need
            q["pages"] += need
            running.append(q)
            admitted.append(q)
            return True

        while waiting and admit(waiting[0]):
            waiting.pop(0)
        if waiting and backfill:  # EASY backfilling: pass the head only if its start is not delayed
            head_need = pages_for(waiting[0]["prompt"])
            avail, start = free, 0
            for left, pages in sorted((q["answer"] - q["made"], q["pages"]) for q in running):
                if avail >= head_need:
                    break
                avail, start = avail + pages, left
            spare = avail - head_need
            for q in list(waiting[1:]):
                need = pages_for(q["prompt"] + q["answer"])
                done_before = q["answer"] + 1 <= start
                if need <= free and (done_before or need <= spare) and admit(q):
                    waiting.remove(q)
                    spare -= 0 if done_before else need
        decoders = [q for q in running if q not in admitted]
        dt = step_time(decoders, admitted) * scale
        now += dt
        busy += dt
        for q in admitted:
            q["made"] = 1
            if q["turn"] >= 1:
                later.append(now - q["arrival"])
        for q in decoders:
            q["made"] += 1
        for q in [q for q in running if q["made"] >= q["answer"]]:
            running.remove(q)
            free += q["pages"]
            s = sessions[q["session"]]
            if q["turn"] + 1 < len(s["turns"]):
                heapq.heappush(arrivals, (now + s["turns"][q["turn"] + 1]["think_time_s"], q["session"], q["turn"] + 1))
    return statistics.mean(later), busy


def main(results_path: str, workload_path: str, system: str) -> None:
    results = json.load(open(results_path))
    sessions = json.load(open(workload_path))["sessions"]
    turns = {(r["session_id"], r["turn_index"]): r for r in results["records"][system]}
    measured = results["systems"][system]
    print(f"{system} measured: compute {measured['compute_s']:.1f} s, TTFT turns>=2 {measured['ttft_later_mean_s']:.3f} s")
    for scale in (0.8, 1.0, 1.2, 1.3, 1.4):
        fcfs, busy = simulate(turns, sessions, backfill=False, scale=scale)
        easy, _ = simulate(turns, sessions, backfill=True, scale=scale)
        print(f"step time x{scale}: busy {busy:.1f} s, TTFT turns>=2 FCFS {fcfs:.3f} s, with backfilling {easy:.3f} s")


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(argv[0] if argv else "docs/results/cpu/results.json",
         argv[1] if len(argv) > 1 else "docs/results/cpu/workload.json",
         argv[2] if len(argv) > 2 else "CachedAttention")
