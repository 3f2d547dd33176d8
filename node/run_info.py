"""What a learner tells its samplers with every published version (the `run.json` file of the manifest).

The learner is the authority on how rollouts must be drawn: the sampling temperature must equal the one its loss
uses, or the importance ratio is biased; the group size and generation limit shape its batches. Samplers read them
from here instead of trusting their own flags. The prompt set travels as questions only (for the synthetic task,
just its parameters): gold answers never leave the learner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields as dataclass_fields
from typing import Any, Sequence

from gepo.data import DataConfig, PromptSet, SyntheticPromptSet
from gepo.sampling import SamplingParams
from gepo.synthetic import SyntheticArithmetic


@dataclass(frozen=True)
class QuestionSet:
    """The samplers' view of the prompt set: index -> question text."""

    name: str
    questions: Sequence[str] | None = None
    synthetic: dict[str, Any] | None = None

    def __len__(self) -> int:
        if self.synthetic is not None:
            size = self.synthetic["size"]
            return min(size, self.synthetic["max_examples"] or size)
        return len(self.questions or ())

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} out of range for {len(self)} prompts")
        if self.synthetic is not None:
            s = self.synthetic
            return SyntheticArithmetic(s["difficulty"], s["seed"], s["split"], s["size"],
                                       s.get("phrasing", "expression"))[index].question
        return self.questions[index]  # type: ignore[index]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "questions": list(self.questions) if self.questions is not None else None,
                "synthetic": self.synthetic}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuestionSet":
        return cls(name=str(data["name"]), questions=data.get("questions"), synthetic=data.get("synthetic"))

    @classmethod
    def of(cls, cfg: DataConfig, prompts: PromptSet) -> "QuestionSet":
        if isinstance(prompts, SyntheticPromptSet):  # its parameters; a filtered subset travels as questions
            synthetic = {"difficulty": cfg.difficulty, "seed": cfg.seed, "split": cfg.split, "size": cfg.size,
                         "max_examples": cfg.max_examples, "phrasing": cfg.phrasing}
            return cls(name=prompts.name, synthetic=synthetic)
        return cls(name=prompts.name, questions=[ex.question for ex in prompts])


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    group_size: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    system_prompt: str | None
    prompts: QuestionSet = field(default_factory=lambda: QuestionSet("empty", questions=[]))
    max_staleness: int = 0
    """The learner drops groups more than this many versions old (0: unknown): samplers skip generating them."""

    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, n=self.group_size, seed=seed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompts"] = self.prompts.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunInfo":
        known = {f.name for f in dataclass_fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}  # a newer learner may add fields
        fields["prompts"] = QuestionSet.from_json(fields["prompts"])
        return cls(**fields)
