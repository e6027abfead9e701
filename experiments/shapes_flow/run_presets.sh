#!/usr/bin/env bash
# Every experiment preset on generator=shapes_flow (issue 19): the runs behind the shapes_flow column of each
# experiments/<preset>/README.md. Two at a time, one torch thread each, into outputs/<generator>/<run>/. shapes_flow
# is not shipped: build it first (steerexp-pretrain 'stages=[generator_flow]' threads=1, 80 min on one thread).
#
#     bash experiments/shapes_flow/run_presets.sh                       # all of them (about 40 min, 2 idle cores)
#     bash experiments/shapes_flow/run_presets.sh cfg_sweep ti_heldout  # the runs whose name contains one of these
#     GENERATOR=shapes bash experiments/shapes_flow/run_presets.sh ...  # the same command lines on the UNet
#     PARALLEL=1 ...                                                    # one run at a time
#     python experiments/shapes_flow/collect.py outputs/shapes_flow     # one JSON of every run's metrics
#
# Overrides beyond the generator are what does not transfer to shapes_flow (the READMEs say why):
#   - Prompt-to-Prompt (+p2p methods, technique.edit.control=p2p): joint attention, no cross-attention maps;
#   - energy guidance's noisy scorer reads the UNet's DDPM-noised latents: the robust scorer on the x0 estimate.
set -uo pipefail
cd "$(dirname "$0")/../.."
GENERATOR=${GENERATOR:-shapes_flow}
OUT=outputs/$GENERATOR
G="generator=$GENERATOR logger=none threads=1"
M="hydra.sweep.dir=$OUT"
R="hydra.run.dir=$OUT"
EG_SEEDS="eval.seeds=[0,1,2,3,4,5,6,7]"  # energy_guidance until 2026-11-22 (the preset now judges seeds 0-31)
# latent_offset_layout's first two presets trained on 4 prompts with seed 0 (the preset now: 6 prompts, seed 3).
# An override with spaces cannot sit in these space-separated lines: the word @PROMPTS4@ stands for it (run()).
PROMPTS4="technique.prompts=[a red circle,a blue square,a green triangle,a yellow ring]"
LO_BEFORE="@PROMPTS4@ seed=0 objective=[concept_score] ~objective.terms.attribute_keep technique.budget.eps_z=8 technique.steps=60"  # until 2026-11-22
NUDGE_BEFORE="technique.keep=null technique.rounds=6"  # nudging_memorisation until 2026-11-22 (now: keep, 10 rounds)
RUNS=(
  "-m experiment=arithmetic_size_sweep $G $M/arithmetic_size_sweep"
  "-m experiment=cfg_sweep $G $M/cfg_sweep"
  "-m experiment=energy_guidance $G technique.scorer=robust $EG_SEEDS technique.scale=1,2,5,10,20 $M/energy_guidance"
  "-m experiment=energy_guidance $G technique.scorer=robust $EG_SEEDS technique.end=0.4 technique.scale=10,30 $M/energy_guidance_end"
  "-m experiment=joint_budget $G technique=prompt_delta,latent_offset,prompt_delta_latent_offset $M/joint_budget"
  "-m experiment=latent_offset_colour $G technique.budget.eps_z=4,16 $M/latent_offset_colour"
  "-m experiment=latent_offset_colour $G technique.latent_mode=per_seed technique.train_seeds=\${eval.seeds} technique.budget.eps_z=16 $M/latent_offset_colour_per_seed"
  "experiment=latent_offset_layout $G $R/latent_offset_layout_keep"
  "experiment=latent_offset_layout $G eval.seeds=[16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31] $R/latent_offset_layout_keep_dev"
  "experiment=latent_offset_layout $G $LO_BEFORE $R/latent_offset_layout"
  "experiment=latent_offset_layout $G $LO_BEFORE technique.lr=0.05 $R/latent_offset_layout_lr05"
  "experiment=latent_offset_layout $G @PROMPTS4@ seed=0 objective=[concept_score] ~objective.terms.attribute_keep technique.budget.eps_z=12 technique.steps=80 $R/latent_offset_layout_e12"
  "experiment=latent_priming $G $R/latent_priming"
  "-m experiment=noise_optimisation/reno,noise_optimisation/noise_search,noise_optimisation/best_of_n,noise_optimisation/latent_priming,noise_optimisation,noise_optimisation/best_of_n_classifier $G $M/noise_optimisation"
  "experiment=nti_edit $G evaluator.edit.methods=[ddim_w1,ddim_w7.5,npi,nti] $R/nti_edit"
  "experiment=nti_reconstruction $G $R/nti_reconstruction"
  "experiment=nudging_memorisation $G $R/nudging_memorisation_keep"
  "experiment=nudging_memorisation $G $NUDGE_BEFORE $R/nudging_memorisation"
  "experiment=nudging_memorisation $G technique.keep=null technique.latent=prompt technique.rounds=3 technique.opt_lr=0.1 $R/nudging_memorisation_prompt"
  "experiment=prompt_delta_colour $G $R/prompt_delta_colour"
  "experiment=prompt_delta_colour $G technique.budget.eps_text=16.1 $R/prompt_delta_colour_eps16"
  "experiment=prompt_search $G $R/prompt_search"
  "experiment=ti_heldout $G $R/ti_heldout"
  "experiment=world_edit_bench $G technique.edit.control=null evaluator.edit_bench.methods=[sdedit_s0.5,sdedit_s0.7,sdedit_s0.9,ddim_w7.5,npi,nti] evaluator.edit_bench.attention_maps=null $R/world_edit_bench"
)
mkdir -p "$OUT"
set -f  # the overrides' [a,b] lists are not globs
run() {
  local name="${1##*$OUT/}" start=$SECONDS
  local -a argv
  read -ra argv <<< "$1"  # the overrides split on spaces
  steerexp "${argv[@]/#@PROMPTS4@/$PROMPTS4}" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?, $(( SECONDS - start )) s"
}
for args in "${RUNS[@]}"; do
  name="${args##*$OUT/}" wanted=$(( $# == 0 ))
  for pattern in "$@"; do [[ "$name" == *"$pattern"* ]] && wanted=1; done
  [ "$wanted" = 1 ] || continue
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; do wait -n; done
  run "$args" &
done
wait
