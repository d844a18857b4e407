"""PMoL (Preference Mixture of LoRAs, arXiv 2411.01245) on moe_ext: LoRA experts grouped per
preference plus null experts, an expert-group soft loss, load balancing, and DPO where the
reference model is the same network with its adapters disabled.

  dpo.py        DPOConfig, pmol_config, the DPO and PMoL losses (and over sampled mixes)
  train.py      train_pmol, evaluate_pmol
  data.py       preference examples (moe_ext.data), tokenisation once, DPO collation
  tokenizer.py  the built-in word tokenizer (a real Hugging Face tokenizer)
  sft.py        supervised fine-tuning on preference rows (the step before DPO)
  generate.py   generation with steering, one prompt or a batch (moe-ext generate)
  synthetic.py  the built-in data, tokenizer and tiny base model
  mixing_world.py  the four-preference world of the mixing evaluation
  scorers.py    programmatic per-preference rewards on generated text
  pareto.py     Pareto fronts and hypervolume
  mixing.py     steering sweeps, Rewarded Soups interpolation, their summaries
  job.py        the whole job (data -> model -> training -> evaluation -> artefact)
"""
from ..molora import get_molora_model, is_steerable, mix_tensor, preference_mix, set_group_bias
from .data import (PreferenceExample, collate_dpo, collate_encoded, encode_examples, load_preference_jsonl,
                   relabel, save_preference_jsonl)
from .dpo import DPOConfig, dpo_loss, mix_loss, pmol_config, pmol_loss, sequence_logps
from .generate import GenerationOptions, generate, generate_batch
from .mixing import (adapter_state, conditioned_scores, load_interpolated, mix_bias, mix_sweep,
                     pair_mixes, soup_sweep, steering_sweep, summarize_sweep)
from .mixing_world import MIXING_PREFERENCES, mixing_preference_data, mixing_tokenizer, neutral_prompts
from .pareto import hypervolume, pareto_front
from .scorers import SCORERS, score_replies
from .sft import sft_loss, train_sft
from .job import PMoLData, PMoLJob, PMoLRun, load_pmol, prepare_data, prepare_model, run_pmol_job
from .synthetic import (SYNTHETIC_PREFERENCES, build_tiny_causal_lm, synthetic_preference_data,
                        synthetic_tokenizer)
from .tokenizer import word_tokenizer, word_tokenizer_from_examples
from .train import evaluate_pmol, sample_mixes, train_pmol

__all__ = ["DPOConfig", "pmol_config", "sequence_logps", "dpo_loss", "pmol_loss", "train_pmol",
           "evaluate_pmol", "build_tiny_causal_lm", "get_molora_model", "set_group_bias",
           "PreferenceExample", "collate_dpo", "collate_encoded", "encode_examples",
           "load_preference_jsonl", "save_preference_jsonl", "word_tokenizer",
           "word_tokenizer_from_examples", "GenerationOptions", "generate", "generate_batch", "prepare_model",
           "SYNTHETIC_PREFERENCES", "synthetic_preference_data", "synthetic_tokenizer",
           "MIXING_PREFERENCES", "mixing_preference_data", "mixing_tokenizer", "neutral_prompts",
           "SCORERS", "score_replies", "pareto_front", "hypervolume", "mix_bias", "pair_mixes",
           "steering_sweep", "soup_sweep", "summarize_sweep", "conditioned_scores",
           "adapter_state", "load_interpolated", "sft_loss", "train_sft", "PMoLJob", "PMoLData", "PMoLRun", "prepare_data",
           "run_pmol_job", "load_pmol", "preference_mix", "mix_tensor", "is_steerable", "relabel",
           "mix_loss", "mix_sweep", "sample_mixes"]
