"""Sparse mixture-of-experts reward model for personalised preferences (after arXiv
2606.04284), on moe_ext's routing kernel.

  model.py      SparseMoERewardModel, RewardConfig, UniversalRewardModel (the baseline)
  fit.py        Bradley-Terry training with sparsity, balance and diversity terms
  baselines.py  ensembles that adaptation re-weights: random heads, shared-base ensemble
  adapt.py      a user's expert weights from a few pairs (Hedge, HyRe, gradient); accuracy;
                purity / NMI
  backbone.py   BackboneRewardModel: an HF model under the MoE head, trained end to end
  saving.py     save / load without pickle (both modes)
  embed.py      text encoders (built-in hashing, all-MiniLM-L6-v2)
  synthetic.py  synthetic personalised data with known latent criteria (and its text form)
  population.py an offline PersonalLLM-style population of users
  evaluate.py   the field's protocol: seen/unseen users x prompts, few-shot curves, global
  interpret.py  routing statistics, expert / base-reward match, expert keyword summaries
  job.py        the train-rm and adapt jobs end to end
"""
from .adapt import (METHODS, adapt, adapt_weights, average_routing, expert_margins,
                    pairwise_accuracy, purity_nmi)
from .backbone import BackboneConfig, BackboneRewardModel, train_backbone_reward_model
from .baselines import HeadEnsemble, random_heads
from .evaluate import ProtocolConfig, evaluate_population
from .interpret import base_reward_match, expert_summaries, routing_stats
from .fit import FitConfig, fit, moe_loss
from .job import (RewardData, RewardJob, RewardRun, adapt_user, evaluate_reward_model,
                  load_reward_data, load_reward_run, load_text_pairs, train_reward_job)
from .model import RewardConfig, SparseMoERewardModel, UniversalRewardModel, check_pairs
from .population import Population, PopulationConfig, make_population
from .saving import load_reward_model, save_reward_model

__all__ = ["SparseMoERewardModel", "RewardConfig", "UniversalRewardModel", "FitConfig", "fit",
           "moe_loss", "adapt", "adapt_weights", "expert_margins", "METHODS", "average_routing",
           "pairwise_accuracy", "purity_nmi", "HeadEnsemble", "random_heads",
           "BackboneRewardModel", "BackboneConfig", "train_backbone_reward_model", "save_reward_model",
           "load_reward_model", "check_pairs", "RewardJob", "RewardData", "RewardRun",
           "load_reward_data", "load_text_pairs", "evaluate_reward_model", "train_reward_job",
           "load_reward_run", "adapt_user", "Population", "PopulationConfig", "make_population",
           "ProtocolConfig", "evaluate_population", "base_reward_match", "expert_summaries",
           "routing_stats"]
