"""Writes BENCHMARKS.md from benchmarks/results/*.json: one table a scenario, each row with its command and machine.

    python -m benchmarks.report
"""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = {
    "case_latency": "python -m benchmarks.case_latency --device cuda [--compile --compress-level 1]",
    "vs_nnunet": "python -m benchmarks.vs_nnunet",
    "engine_throughput": "python -m benchmarks.engine_throughput",
    "dataset_throughput": "python -m benchmarks.dataset_throughput --cases 16",
    "precision_masks": "python -m benchmarks.precision_masks",
    "gpu_parity": "python -m benchmarks.gpu_parity",
    "cpu_vs_nnunet": "python -m benchmarks.cpu_vs_nnunet",
    "scaling": "python -m benchmarks.scaling --cases 8",
    "engine_profile": "python -m benchmarks.engine_profile",
    "gzip_read": "python -m benchmarks.gzip_read",
    "conv_alternatives": "python -m benchmarks.conv_alternatives",
    "fused_conv": "python -m benchmarks.fused_conv",
    "models_vs_nnunet/cascade": "python -m benchmarks.models_vs_nnunet --scenario cascade --cases 2",
    "models_vs_nnunet/ensemble": "python -m benchmarks.models_vs_nnunet --scenario ensemble",
    "skip_decision": "python -m benchmarks.skip_decision --cases 5000",
    "mask_gzip": "python -m benchmarks.mask_gzip",
    "predict_vs_nnunet": "python -m benchmarks.predict_vs_nnunet --cases 16 64 --nnunet-cases 2",
    "dicom_vs_nifti": "python -m benchmarks.dicom_vs_nifti",
    "startup_profile": "python -m benchmarks.startup_profile",
    "fast_path_parts": "python -m benchmarks.fast_path_parts",
    "postprocess_cc": "python -m benchmarks.postprocess_cc",
    "aoti_load": "python -m benchmarks.aoti_load",
    "conv8_throughput": "python -m benchmarks.conv8_throughput",
    "demo_precision": "python -m benchmarks.demo_precision",
}

# result files written by a command other than their scenario's plain one (the exact command, run on the H100 with
# shared/device's base bundle and the isal wheel on PYTHONPATH)
FILE_COMMANDS = {
    "cpu2core_demo_precision_minmax.json": "python -m benchmarks.demo_precision --calibration-method minmax",
    "cpu2core_models_vs_nnunet_cascade_sensitivity.json": "python -m benchmarks.models_vs_nnunet --scenario cascade "
                                                          "--cases 1 --shape 64 64 40 --skip-accumulate-fp16 "
                                                          "--nnunet-given-trtseg-lowres",
    "h200_models_vs_nnunet_ensemble.json": "timeout 440 python -m benchmarks.models_vs_nnunet --scenario ensemble "
                                           "--cases 1 --skip-accumulate-fp16 (cut off in nnUNetv2_apply_postprocessing)",
    "h200_engine_throughput_pipeline.json": "python -m benchmarks.engine_throughput --batches 4 --repeats 5 --configs "
                                            "fp16+compile+cl+half+fold+merge+fuse+graphs (after the one-pipeline "
                                            "refactor: options declared once, rewrites in trtseg/accel/rewrites)",
    "h200_case_latency_pipeline.json": "python -m benchmarks.case_latency --device cuda --compile --channels-last "
                                       "--fp16-weights --fold-convolutions --merge-upsampling --fuse-norms "
                                       "--compress-level 1 --mirroring off --repeats 5 (after the one-pipeline "
                                       "refactor; integer CTs cast to float32 on the GPU)",
    "h100_case_latency_compile_igzip1.json": "python -m benchmarks.case_latency --device cuda --compile --compress-level 1",
    "h100_case_latency_eager_igzip1.json": "python -m benchmarks.case_latency --device cuda --compress-level 1 --mirroring off",
    "h100_case_latency_fast.json": "python -m benchmarks.case_latency --device cuda --compile --channels-last "
                                   "--fp16-weights --compress-level 1",
    "h100_engine_throughput_fast.json": "python -m benchmarks.engine_throughput --batches 4 8 --configs fp16+compile "
                                        "fp16+compile+cl+half",
    "h100_dataset_throughput_fast.json": "TRTSEG_ACTOR_TRACE=1 python -m benchmarks.dataset_throughput --cases 16 "
                                         "--compile --channels-last --fp16-weights --compress-level 1 "
                                         "--max-cases-in-flight 8 (Inductor's cache cold; the trace adds host times "
                                         "of case starts and exports to the JSON)",
    "h100_precision_masks_fast.json": "python -m benchmarks.precision_masks --only fp16_weights_compiled_channels_last",
    "h100_engine_throughput_freeze.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                          "fp16+compile+cl+half fp16+compile+cl+half+freeze",
    "h100_case_latency_max_autotune.json": "python -m benchmarks.case_latency --device cuda --compile max-autotune "
                                           "--channels-last --fp16-weights --compress-level 1",
    "h100_case_latency_max_autotune_cached.json": "the same with --mirroring on, run right after it in a second process "
                                                  "(Inductor's cache warm); measured before the mask crossed to the host "
                                                  "as uint8 (export 0.26 s, now 0.05 s)",
    "h100_dataset_throughput_fast_warm_cache.json": "python -m benchmarks.dataset_throughput --cases 16 --compile "
                                                    "--channels-last --fp16-weights --compress-level 1 "
                                                    "--max-cases-in-flight 8, run again right after the first "
                                                    "(Inductor's cache warm)",
    "h100_dataset_throughput_fast_pinned.json": "python -m benchmarks.dataset_throughput --cases 16 --compile "
                                                "--channels-last --fp16-weights --compress-level 1 "
                                                "--max-cases-in-flight 8, after host<->device copies went through "
                                                "pinned memory (trtseg/transfer.py) and cases report their peak GPU "
                                                "memory; Inductor's cache cold",
    "h100_dataset_throughput_fast_pinned_warm_cache.json": "the same, run again right after it (Inductor's cache "
                                                           "warm)",
    "h100_case_latency_max_autotune_pinned.json": "python -m benchmarks.case_latency --device cuda --compile "
                                                  "max-autotune --channels-last --fp16-weights --compress-level 1, "
                                                  "after the pinned-copy change (Inductor's cache cold)",
    "h100_case_latency_max_autotune_gzip16.json": "TRTSEG_GZIP_THREADS=16 python -m benchmarks.case_latency --device "
                                                  "cuda --compile max-autotune --channels-last --fp16-weights "
                                                  "--compress-level 1 (another machine instance, Inductor's cache cold)",
    "h100_case_latency_max_autotune_pinned_repeat.json": "the same without TRTSEG_GZIP_THREADS (8 threads), right after "
                                                         "it on that instance (Inductor's cache warm)",
    "h100_engine_throughput_fold.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                        "fp16+compile+cl+half fp16+compile+cl+half+fold fp16+max+cl+half+fold",
    "h100_precision_masks_fold.json": "python -m benchmarks.precision_masks --only "
                                      "fp16_weights_compiled_channels_last_folded",
    "h100_case_latency_max_autotune_fold.json": "python -m benchmarks.case_latency --device cuda --compile max-autotune "
                                                "--channels-last --fp16-weights --fold-convolutions --compress-level 1 "
                                                "(Inductor's cache cold)",
    "h100_dataset_throughput_tile_thread_warmup.json": "python -m benchmarks.dataset_throughput --cases 16 --compile "
                                                        "--channels-last --fp16-weights --compress-level 1 "
                                                        "--max-cases-in-flight 8, after the actor's warm-up moved to "
                                                        "its tile thread (Inductor's cache cold)",
    "h100_dataset_throughput_tile_thread_warmup_fold.json": "the same with --fold-convolutions, right after it",
    "h100_engine_throughput_merge.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                         "fp16+compile+cl+half+fold fp16+compile+cl+half+fold+merge "
                                         "fp16+compile+cl+half+merge",
    "h100_precision_masks_merge.json": "python -m benchmarks.precision_masks --only "
                                       "fp16_weights_compiled_channels_last_folded_merged",
    "h100_engine_throughput_merge_max.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                             "fp16+max+cl+half+fold+merge (Inductor's cache cold)",
    "h100_engine_profile_merge.json": "python -m benchmarks.engine_profile --config fp16+max+cl+half+fold+merge, "
                                      "right after h100_engine_throughput_merge_max.json",
    "h100_case_latency_max_autotune_merge.json": "python -m benchmarks.case_latency --device cuda --compile "
                                                 "max-autotune --channels-last --fp16-weights --fold-convolutions "
                                                 "--merge-upsampling --compress-level 1, right after "
                                                 "h100_engine_profile_merge.json (Inductor's cache warm)",
    "h100_dataset_throughput_merge.json": "python -m benchmarks.dataset_throughput --cases 16 --compile "
                                          "--channels-last --fp16-weights --fold-convolutions --merge-upsampling "
                                          "--compress-level 1 --max-cases-in-flight 8 (a fresh machine instance, "
                                          "Inductor's cache cold)",
    "h100_engine_throughput_fuse_ab.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                           "fp16+compile+cl+half+fold+merge fp16+compile+cl+half+fold+merge+fuse "
                                           "fp16+compile+cl+half+fold+merge+fuse+graphs, at aff7035 less two "
                                           "changes (the stem's tile 64 -> 128 voxels, the head writing "
                                           "(b, class, z, y, x))",
    "h100_engine_throughput_fuse.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                        "fp16+compile+cl+half+fold+merge+fuse "
                                        "fp16+compile+cl+half+fold+merge+fuse+graphs",
    "h100_engine_profile_fuse.json": "python -m benchmarks.engine_profile --config "
                                     "fp16+compile+cl+half+fold+merge+fuse, right after "
                                     "h100_engine_throughput_fuse.json",
    "h100_engine_throughput_fuse_max.json": "python -m benchmarks.engine_throughput --batches 4 --configs "
                                            "fp16+max+cl+half+fold+merge+fuse+graphs, right after "
                                            "h100_engine_profile_fuse.json",
    "h100_engine_throughput_fuse_max_repeat.json": "python -m benchmarks.engine_throughput --batches 4 --repeats 5 "
                                                   "--configs fp16+max+cl+half+fold+merge+fuse+graphs, the same "
                                                   "machine instance 20 minutes later",
    "h100_precision_masks_fuse.json": "python -m benchmarks.precision_masks --only "
                                      "fp16_weights_compiled_channels_last_folded_merged "
                                      "fp16_weights_compiled_channels_last_folded_merged_fused",
    "h200_fused_conv_sweep.json": "python -m benchmarks.fused_conv at 3cad572 (its engine part then compared the "
                                  "module's defaults, ac802d8's, with the sweep's fastest, which was the same)",
    "h200_engine_throughput_fuse.json": "TRTSEG_CONV_CONFIGS=2:64,2,4,4,1 python -m benchmarks.engine_throughput "
                                        "--batches 4 --repeats 5 --configs fp16+compile+cl+half+fold+merge+fuse+graphs, "
                                        "at 3cad572 (the kernels' configurations as at ac802d8), right after "
                                        "h200_fused_conv_sweep.json",
    "h200_engine_profile_fuse.json": "python -m benchmarks.engine_profile --config fp16+compile+cl+half+fold+merge+fuse "
                                     "at 3cad572, right after h200_engine_throughput_fuse.json",
    "h200_precision_masks_fuse.json": "python -m benchmarks.precision_masks --only "
                                      "fp16_weights_compiled_channels_last_folded_merged_fused at 3cad572",
    "h200_fused_conv_engine_ab_fuse64.json": "python -m benchmarks.fused_conv --no-sweeps at 75e8eff, where "
                                             "FUSED_WIDTHS was (32, 64): 'after' fuses the 64->64 blocks too "
                                             "(not kept)",
    "h200_engine_throughput_fuse64.json": "python -m benchmarks.engine_throughput --batches 4 --repeats 5 --configs "
                                          "fp16+compile+cl+half+fold+merge+fuse+graphs at 75e8eff (64->64 blocks "
                                          "fused, not kept)",
    "h200_engine_profile_fuse64.json": "python -m benchmarks.engine_profile --config "
                                       "fp16+compile+cl+half+fold+merge+fuse at 75e8eff (64->64 blocks fused, not "
                                       "kept)",
    "h200_precision_masks_fuse64.json": "python -m benchmarks.precision_masks --only "
                                        "fp16_weights_compiled_channels_last_folded_merged_fused at 75e8eff (64->64 "
                                        "blocks fused, not kept)",
    "h200_engine_throughput_fuse64_max.json": "python -m benchmarks.engine_throughput --batches 4 --repeats 5 "
                                              "--configs fp16+max+cl+half+fold+merge+fuse+graphs at 75e8eff (64->64 "
                                              "blocks fused, not kept; Inductor's cache cold)",
    "h200_fused_conv_engine_ab.json": "python -m benchmarks.fused_conv --no-sweeps on the code as submitted: 'before' "
                                      "is ac802d8's configurations, 'after' the per-shape ones, 32-channel blocks "
                                      "only in both",
    "h100_predict_vs_nnunet_eager_few.json": "python -m benchmarks.predict_vs_nnunet --cases 16 64 --nnunet-cases 2, "
                                             "after runs of fewer than 8 passes went without compile (--compile-from); "
                                             "another machine instance than h100_predict_vs_nnunet.json",
    "h100_predict_one_compile_thread.json": "python -m benchmarks.predict_vs_nnunet --cases 16 64 --skip-nnunet, "
                                            "after a loaded compile cache set one compile thread (on a machine "
                                            "whose Inductor disk cache was warm: the 'cold' run is not cold)",
    "h100_startup_profile_eager.json": "python -m benchmarks.startup_profile, when fewer than 8 passes ran without "
                                       "compile but with the fused norms (another machine instance)",
    "h100_startup_profile_eager_no_fuse.json": "python -m benchmarks.startup_profile --flags=--no-fuse-norms, the "
                                               "same machine instance as h100_startup_profile_eager.json",
    "h100_startup_profile.json": "python -m benchmarks.startup_profile, before a loaded compile cache set one "
                                 "compile thread",
    "h100_startup_profile_one_compile_thread.json": "python -m benchmarks.startup_profile, after a loaded compile "
                                                    "cache set one compile thread (Inductor's disk cache warm from "
                                                    "an earlier run on the machine: 'cold' is trtseg's cache only)",
    "h100_predict_vs_nnunet_one_ct.json": "python -m benchmarks.predict_vs_nnunet --cases --nnunet-cases 1 "
                                          "--mirrored-cases 1 --nnunet-timeout 120, when small runs kept "
                                          "channels-last (eager, without the fused norms: slower than autocast)",
    "h100_models_vs_nnunet_cascade_stages.json": "timeout 225 python -m benchmarks.models_vs_nnunet --scenario "
                                                 "cascade --cases 1 --skip-accumulate-fp16 (cut off before its "
                                                 "agreements were written; its steps' seconds only)",
    "h100_predict_vs_nnunet_prepare_ahead.json": "timeout 440 python -m benchmarks.predict_vs_nnunet --cases 16 64 "
                                                 "--nnunet-cases 16 --nnunet-timeout 200 (cut off in nnUNetv2's run), "
                                                 "after the reader thread prepared cases and the command ended "
                                                 "without the interpreter's teardown; small runs without "
                                                 "channels-last",
    "h100_startup_profile_small_run.json": "timeout 75 python -m benchmarks.startup_profile --profile (its cProfile "
                                           "run cut off), the same code and machine instance as "
                                           "h100_predict_vs_nnunet_prepare_ahead.json",
    "h100_startup_profile_16_cts.json": "timeout 170 python -m benchmarks.startup_profile --cases 16 --profile (its "
                                        "cProfile run cut off), the same code and machine instance as "
                                        "h100_predict_vs_nnunet_prepare_ahead.json",
    "h100_predict_vs_nnunet_16_cts.json": "timeout 575 python -m benchmarks.predict_vs_nnunet --cases 16 "
                                          "--nnunet-cases 16 --nnunet-timeout 390 --no-one-ct",
    "h100_startup_profile_16_cts_prepare_ahead_ab.json": "timeout 270 python -m benchmarks.startup_profile --cases 16 "
                                                         "--env TRTSEG_PREPARE_AHEAD=0 --no-threads-run (warm runs: "
                                                         "prepare-ahead on, off, on)",
    "h100_aoti_load.json": "timeout 270 python -m benchmarks.aoti_load --configs fast fast_unfused --timeout 200 (cut "
                           "off before fast_unfused; the loading process had not registered trtseg's custom ops)",
    "h200_predict_aoti_package.json": "timeout 265 python -m benchmarks.predict_vs_nnunet --cases 16 --skip-nnunet "
                                      "--no-one-ct at 23b5d42 (compiled packages on by default, fused norms as "
                                      "torch.library.triton_op): both runs died with SIGSEGV (exit -11) after the "
                                      "network's export, before the fast path's check ended; the package is opt-in "
                                      "(--compiled-package) since",
    "h100_predict_vs_nnunet_packages_sigsegv.json": "timeout 565 python -m benchmarks.predict_vs_nnunet --cases 16 64 "
                                                    "--nnunet-cases 2 at 601e1a5 with compiled packages on by default "
                                                    "(fused norms as torch.library.custom_op, the build in a child "
                                                    "process): the child died (SIGSEGV), the entry was marked "
                                                    "unusable and every run went on with torch.compile and its compile "
                                                    "cache, the committed default's path",
    "h100_conv8_throughput.json": "python -m benchmarks.conv8_throughput at cd281a2: int8 did not compile (Triton "
                                  "3.6 wanted out_dtype for its int32 sums) and the network rewrite did not reach "
                                  "nnU-Net's blocks (they call their convolutions through all_modules), so its "
                                  "fp8/int8 engines ran the fp16 network; the per-shape fp8 timings are the kernel's",
    "h100_models_vs_nnunet_cascade_stages_2.json": "timeout 330 python -m benchmarks.models_vs_nnunet --scenario "
                                                   "cascade --cases 1 --skip-accumulate-fp16",
    "cpu2core_aoti_load.json": "python -m benchmarks.aoti_load --small --configs plain (a 2-core CPU: 8->64 "
                               "features at 32x48x48, fp32)",
    "h100_case_latency_fast_pinned.json": "python -m benchmarks.case_latency --device cuda --compile --channels-last "
                                          "--fp16-weights --compress-level 1, after host<->device copies went through "
                                          "pinned memory (another machine instance than h100_case_latency_fast.json)",
}


# BENCHMARKS.md's sections: what the product does, and the scenarios whose results show it
SECTIONS = [
    ("`trtseg predict` with default flags: whole processes", ("predict_vs_nnunet", "startup_profile",
                                                                "dicom_vs_nifti", "fast_path_parts", "aoti_load")),
    ("Whole commands against nnUNetv2", ("vs_nnunet", "models_vs_nnunet", "cpu_vs_nnunet")),
    ("One case end to end, in a warm process", ("case_latency",)),
    ("The Ray job", ("dataset_throughput", "scaling")),
    ("The network: engine throughput, profiles and kernels", ("engine_throughput", "engine_profile",
                                                              "conv_alternatives", "fused_conv", "conv8_throughput")),
    ("Masks of the fast paths against fp32 and the CPU", ("precision_masks", "gpu_parity", "demo_precision")),
    ("Reading, writing, postprocessing and deciding reruns", ("gzip_read", "mask_gzip", "postprocess_cc",
                                                              "skip_decision")),
]


def _machine(r: dict) -> str:
    m = r.get("machine", {})
    return f"{m.get('gpu') or m.get('cpu')} ({m.get('cpu_count')} CPUs), torch {m.get('torch')}"


def rows(r: dict) -> list[str]:
    s = r["scenario"]
    if s == "case_latency":
        return [f"{k}: {v['median_wall_seconds']} s, stages {v['median_stage_seconds']}, settings {v['settings']}"
                for k, v in r["runs"].items()]
    if s == "skip_decision":
        return [f"{r['cases']} cases, local disk: {r['local']['seconds_per_1000_cases']} s per 1000 cases",
                f"moto S3 on loopback: {r['s3_moto_loopback']['seconds_per_1000_cases']} s per 1000 cases, requests "
                f"{r['s3_moto_loopback']['s3_requests']}"]
    if s == "mask_gzip":
        return [f"{name} ({m['labels']} labels, {m['raw_bytes']} bytes raw): " + ", ".join(
            f"level {lv} {x['seconds']} s {x['bytes']} bytes" for lv, x in m["levels"].items())
            for name, m in r["masks"].items()]
    if s.startswith("models_vs_nnunet/"):
        total = r.get("nnunetv2_total_seconds") or f"at least {r.get('nnunetv2_total_seconds_at_least')}"
        speedup = r.get("speedup") or f"at least {r.get('speedup_at_least')}"
        warm = (f"; warm engine cache {r['trtseg_warm_seconds']} s ({r['speedup_warm']}x)"
                if "trtseg_warm_seconds" in r else "")
        out = [f"{r['cases']} CT(s) {r['shape_xyz']}, whole commands, no mirroring: nnUNetv2 {r['nnunetv2_seconds']} "
               f"= {total} s; `{r['trtseg_command']}` {r['trtseg_seconds']} s ({speedup}x){warm}",
               f"masks vs nnUNetv2: {r['voxel_agreement_vs_nnunet']}"]
        if "voxel_agreement_vs_nnunet_accumulate_fp16" in r:
            out.append(f"with --accumulate fp16: {r['voxel_agreement_vs_nnunet_accumulate_fp16']}")
        if "voxel_agreement_lowres_stage_vs_nnunet" in r:
            given = r.get("voxel_agreement_cascade_given_nnunet_lowres")
            out.append(f"each stage on its own: the low-res stage {r['voxel_agreement_lowres_stage_vs_nnunet']}; the "
                       f"cascade stage given nnU-Net's low-res masks {given}")
        if "voxel_agreement_nnunet_given_trtseg_lowres_vs_nnunet" in r:
            out.append(f"nnUNetv2's cascade stage given trtseg's low-res masks, against its own chained output: "
                       f"{r['voxel_agreement_nnunet_given_trtseg_lowres_vs_nnunet']}")
        if r.get("note"):
            out.append(r["note"])
        return out
    if s == "vs_nnunet":
        return [f"{k}: nnUNetv2 {v['nnunetv2_predict_seconds']} s vs trtseg {v['trtseg_median_seconds']} s "
                f"({v['speedup']}x), masks agree {v['voxel_agreement']:.5f}" for k, v in r["runs"].items()]
    if s == "engine_throughput":
        return [f"{x['config']} batch {x['batch']}: {x.get('patches_per_s')} patches/s, {x.get('tflop_per_s')} TFLOP/s "
                f"({x.get('fraction_of_floor')} of the {r['tensor_core_floor_patches_s']} patches/s floor)" for x in r["runs"]]
    if s == "dataset_throughput":
        out = [f"{r['cases']} volumes {r['shape_xyz']}: {r['wall_seconds']} s wall, {r['volumes_per_gpu_hour']} volumes/GPU-hour, "
               f"engine busy {r['engine_busy_fraction']} (since its first tile "
               f"{r.get('engine_busy_since_first_tile', 'not measured')}), stage medians {r['median_stage_seconds']}, object store MB/case "
               f"{r['median_object_store_mb_per_case']}, peak host RSS MB {r.get('peak_rss_mb')}, peak GPU MB per actor "
               f"{r.get('peak_gpu_memory_mb_actors')} and per case {r.get('peak_gpu_memory_mb_per_case', 'not measured')}"]
        if "engine_busy_in_span" in r:
            out.append(f"in the GPU span: engine busy {r['engine_busy_in_span']}, GPU busy (any of the actor's work) "
                       f"{r.get('gpu_busy_in_span', 'not measured')}, {r.get('volumes_per_gpu_hour_in_span')} "
                       f"volumes/GPU-hour, engine idle gaps {r.get('engine_gap_seconds')} s (case starts: "
                       f"{r.get('case_gap_seconds', 'not split')}); warm-up {r.get('warmup_seconds')} s; "
                       f"NVML utilization {r.get('gpu_utilization_nvml', 'not measured')}")
        return out
    if s == "engine_profile":
        return [f"{r['config']} batch {r['batch']}: {r['gpu_ms_per_batch']} ms of GPU kernels per batch, by kind "
                f"{r['by_kind_ms_per_batch']}"]
    if s == "gzip_read":
        return [f"{r['compressed_mb']} MB -> {r['raw_mb']} MB: decompress {r['decompress_seconds']} s; read_case "
                f"{r['read_case_seconds']} s"]
    if s == "precision_masks":
        return [f"agreement with fp32 masks: {r['agreement_vs_fp32']}"]
    if s == "gpu_parity":
        return [f"{c['model']}/{c['case']}: cuda fp32 {c['agreement_cuda_fp32_vs_cpu']:.5f}, cuda fp16 "
                f"{c['agreement_cuda_fp16_vs_cpu']:.5f} vs cpu" for c in r["cases"]]
    if s == "scaling":
        return [f"{x['actors']} actor(s) at {x['gpus_per_actor']} GPU: {x['wall_seconds']} s wall, "
                f"{x.get('volumes_per_s_in_span')} volumes/s in the GPU span, tiles {x['tiles_per_actor']}, "
                f"engine busy in span {x.get('engine_busy_in_span')}, GPU busy in span "
                f"{x.get('gpu_busy_in_span', 'not measured')}, partials {x['median_partials_mb_per_case']} MB/case"
                for x in r["runs"]]
    if s == "cpu_vs_nnunet":
        return [f"nnUNetv2 {r['nnunetv2_seconds']} s; " + "; ".join(
            f"{k} {v['median_seconds']} s ({v['speedup_vs_nnunet']}x, agree {v['voxel_agreement_vs_nnunet']:.5f})"
            for k, v in r["runs"].items())]
    if s == "conv_alternatives":
        out = [f"cuDNN {r['cudnn']}, benchmark limit {r['benchmark_limit']}, batch {r['batch']}"]
        out += [f"{x['layer']} (x{x['count']}): {x['ms']} ms, {x['tflop_per_s']} TFLOP/s" for x in r.get("layers", [])]
        fusion = r.get("fusion", {})
        out += [f"cuDNN fused graph, {k}: {v}" for k, v in fusion.items() if isinstance(v, dict)]
        if "skipped" in fusion:
            out.append(f"cuDNN fused graphs: skipped ({fusion['skipped']})")
        if "torch_conv_ms" in fusion:
            out.append(f"torch's 32->32 convolution at batch 1 for comparison: {fusion['torch_conv_ms']} ms")
        fold = r.get("fold", {})
        out += [f"width-folded {k}: {v}" for k, v in fold.get("layers", {}).items()]
        out += [f"network kernels per batch, {k}: {v['total']} ms, by kind {v['by_kind']}"
                for k, v in fold.get("network_kernel_ms_per_batch", {}).items()]
        return out
    if s == "predict_vs_nnunet":
        out = [f"{k}: {v['cases']} CT(s) {v['seconds']} s" + (f", {v['volumes_per_gpu_hour']} volumes per GPU-hour, "
                                                               f"start-up {v.get('startup_seconds')}, compile cache "
                                                               f"{(v['engine'].get('compile_cache') or {}).get('status')}"
                                                               if v.get("exit") == 0 else f" (exit {v.get('exit')})")
               for k, v in r["runs"].items()]
        if "nnunetv2" in r:  # results written before nnUNetv2 ran on several counts
            out.append(f"nnUNetv2_predict on {r['nnunetv2']['cases']} CTs: {r['nnunetv2']['seconds']} s "
                       f"(trtseg {r.get('speedup_same_cases')}x faster on the same CTs)")
        for k, v in r.get("nnunetv2_runs", {}).items():
            took = f"{v['seconds']} s" if "seconds" in v else f">= {v.get('seconds_at_least')} s ({v.get('cut_off')})"
            faster = v.get("speedup") or (f">= {v['speedup_at_least']}" if "speedup_at_least" in v else None)
            out.append(f"nnUNetv2_predict {k} (mirroring {v.get('mirroring')}): {took}; trtseg's {v.get('trtseg_run')} "
                       f"{faster}x faster, masks agree {v.get('agreement_trtseg_vs_nnunetv2')}")
        out += [f"{k}: {r[k]} s" for k in ("trtseg_seconds_per_case_steady", "nnunetv2_seconds_per_case_steady")
                if k in r]
        out += [f"masks of the default against {k.split('_vs_')[1]}: {r[k]}"
                for k in ("agreement_default_vs_fp32", "agreement_default_vs_nnunetv2") if k in r]
        return out
    if s == "demo_precision":
        out = [f"calibration: {r['calibration']}, {r['calibration_method']}; cases {', '.join(r['cases'])}"]
        for name, run in r["runs"].items():
            line = f"{name}: Dice against the reference {run.get('dice_vs_reference')}"
            if run.get("vs_fp32"):
                line += f"; against fp32 {run['vs_fp32']}"
            gate = (run.get("calibration") or {}).get("gate")
            line += f"; refused by the gate ({run['refused'].split('refused: ')[-1]})" if run.get("refused") else \
                (f"; gate: {gate}" if gate else "")
            out.append(line + (f"; error {run['error']}" if run.get("error") else ""))
        return out
    if s == "conv8_throughput":
        out = [f"{v['cin']}->{v['cout']} stride {max(v['stride'])} at {v['size']} (x{len(v['layers'])}): cuDNN fp16 "
               f"{v['fp16_cudnn_ms']} ms ({v['fp16_cudnn_tflop_s']} TFLOP/s)" + "".join(
                   f"; {f} {v[f + '_ms']} ms ({v[f + '_tflop_s']} TFLOP/s, {v[f + '_speedup_vs_fp16']}x)"
                   for f in ("fp8", "int8") if v.get(f + "_ms") not in (None, float("inf")))
               for v in r["shapes"]]
        return out + [f"{k}: " + ", ".join(f"{x} {v[x]}" for x in ("config", "patches_per_s", "tflop_per_s",
                                                                  "mask_agreement_vs_fp32", "error") if x in v)
                      for k, v in r["engines"].items()]
    if s == "aoti_load":
        out = []
        for config, steps in r["configs"].items():
            for step, v in steps.items():
                out.append(f"{config} {step}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
        return out
    if s == "startup_profile":
        return [f"{k}: {v['seconds']} s process, run report {(v.get('report') or {}).get('wall_seconds')} s, start-up "
                f"{(v.get('report') or {}).get('startup_seconds')}, {v.get('after_last_line')} s after the last "
                f"log line" for k, v in r["runs"].items()]
    if s == "dicom_vs_nifti":
        return [f"{k}: {v['seconds']} s, stages {v.get('case_seconds')}" for k, v in r["runs"].items()] + [
            f"inputs equal {r.get('inputs_equal')}, masks equal {r.get('masks_equal')} "
            f"(agreement {r.get('agreement_dicom_vs_nifti')}), affines equal {r.get('affines_equal')}"]
    if s == "postprocess_cc":
        return [f"{lib}: " + ", ".join(f"{k} {v['seconds']} s" for k, v in x.items())
                for lib, x in r["libraries"].items()] + [f"masks equal: {r['masks_equal']}"]
    if s == "fast_path_parts":
        return [f"{k}: {v['patches_per_s']} patches/s, check patches vs fp32 {v['check_vs_fp32']}, real CT patches vs "
                f"fp32 {v['real_vs_fp32']}" for k, v in r["configs"].items()]
    if s == "fused_conv":
        out = []
        for sw in r["sweeps"]:
            best = sw["best"][0] if sw["best"] else {}
            out.append(f"{sw['name']}, {sw['shape']}: fastest {best.get('config')} {best.get('ms')} ms "
                       f"({best.get('tflop_per_s')} TFLOP/s) of {len(sw['all'])} configurations; cuDNN without "
                       f"statistics {sw['cudnn_ms_without_stats']} ms")
        out += [f"engine {r.get('engine_config')}, {e['label']}, fused widths {e.get('fused_widths', [32])}, "
                f"configurations {e['conv_configs']}: {e['patches_per_s']} patches/s"
                for e in r.get("engine", [])]
        return out
    return [json.dumps(r)[:300]]


def main() -> None:
    lines = ["# Benchmarks", "", "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`. Each file was",
             "written by the command shown, on the machine shown. Warm-up (and compile) runs are excluded and stated in",
             "the JSON; figures are medians over repeats.", ""]
    results = [(p, json.load(open(p))) for p in sorted(glob.glob(os.path.join(HERE, "results", "*.json")))]
    for title, scenarios in SECTIONS:
        group = [(p, r) for p, r in results if r["scenario"].split("/")[0] in scenarios]
        if not group:
            continue
        lines += [f"## {title}", ""]
        for path, r in group:
            name = os.path.basename(path)
            lines += [f"### {name}", "", f"- command: `{FILE_COMMANDS.get(name) or COMMANDS.get(r['scenario'], '?')}`",
                      f"- machine: {_machine(r)}", ""] + [f"- {x}" for x in rows(r)] + [""]
    with open(os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
