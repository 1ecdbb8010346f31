"""One LightningModule per stage; configs pick one by ``class_path`` (short names work)."""

from kdlab.stages.rank_distill_student import RankDistillStudent
from kdlab.stages.rl_distill_kstep import RLDistillKStep
from kdlab.stages.teacher_cpt import TeacherCPT
from kdlab.stages.teacher_rank_sft import TeacherRankSFT

__all__ = ["RLDistillKStep", "RankDistillStudent", "TeacherCPT", "TeacherRankSFT"]
