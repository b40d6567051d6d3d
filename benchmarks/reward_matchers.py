"""Do the rapidfuzz and difflib matchers make the same reward decision, and how fast are they?

Builds thousands of (prediction, label) pairs from a list of rare-disease names: exact, case and
punctuation variants, hypernym-like generalisations, truncations, typos and unrelated diseases.
For each pair, each matcher decides `similarity > 0.8`; the script reports how often the two
agree (overall and per kind), the time per pair of each matcher, and the time to score a batch
of 1,024 realistic responses with `score_batch` (and to analyse them, as the reward worker
also does). The last line of output is a JSON summary.

    python benchmarks/reward_matchers.py [--seed 0] [--typo-samples 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import time

from jaxzero.diagnosis import reward
from jaxzero.diagnosis.analysis import analyze_response, summarize

# (name, a broader class it belongs to). The classes stand in for hypernyms: a model that
# answers "vasculitis" for Takayasu arteritis is right in kind but not in the name.
DISEASES = [
    ("Erdheim-Chester disease", "histiocytosis"),
    ("Langerhans cell histiocytosis", "histiocytosis"),
    ("Rosai-Dorfman disease", "histiocytosis"),
    ("Hemophagocytic lymphohistiocytosis", "histiocytosis"),
    ("Fabry disease", "lysosomal storage disease"),
    ("Gaucher disease type 1", "lysosomal storage disease"),
    ("Gaucher disease type 3", "lysosomal storage disease"),
    ("Pompe disease", "glycogen storage disease"),
    ("Niemann-Pick disease type C", "lysosomal storage disease"),
    ("Niemann-Pick disease type A", "lysosomal storage disease"),
    ("Mucopolysaccharidosis type I", "mucopolysaccharidosis"),
    ("Hunter syndrome", "mucopolysaccharidosis"),
    ("Tay-Sachs disease", "GM2 gangliosidosis"),
    ("Krabbe disease", "leukodystrophy"),
    ("Metachromatic leukodystrophy", "leukodystrophy"),
    ("X-linked adrenoleukodystrophy", "leukodystrophy"),
    ("Alexander disease", "leukodystrophy"),
    ("Takayasu arteritis", "large vessel vasculitis"),
    ("Giant cell arteritis", "large vessel vasculitis"),
    ("Polyarteritis nodosa", "medium vessel vasculitis"),
    ("Kawasaki disease", "medium vessel vasculitis"),
    ("Granulomatosis with polyangiitis", "ANCA-associated vasculitis"),
    ("Eosinophilic granulomatosis with polyangiitis", "ANCA-associated vasculitis"),
    ("Microscopic polyangiitis", "ANCA-associated vasculitis"),
    ("Cryoglobulinemic vasculitis", "small vessel vasculitis"),
    ("IgA vasculitis", "small vessel vasculitis"),
    ("Behçet disease", "variable vessel vasculitis"),
    ("Cogan syndrome", "variable vessel vasculitis"),
    ("Castleman disease", "lymphoproliferative disorder"),
    ("Unicentric Castleman disease", "lymphoproliferative disorder"),
    ("Idiopathic multicentric Castleman disease", "lymphoproliferative disorder"),
    ("Kikuchi-Fujimoto disease", "histiocytic necrotizing lymphadenitis"),
    ("Kimura disease", "lymphoproliferative disorder"),
    ("Autoimmune lymphoproliferative syndrome", "primary immunodeficiency"),
    ("Guillain-Barré syndrome", "acute polyneuropathy"),
    ("Miller Fisher syndrome", "acute polyneuropathy"),
    ("Chronic inflammatory demyelinating polyneuropathy", "chronic polyneuropathy"),
    ("Charcot-Marie-Tooth disease type 1A", "hereditary motor and sensory neuropathy"),
    ("Multifocal motor neuropathy", "immune-mediated neuropathy"),
    ("Lambert-Eaton myasthenic syndrome", "neuromuscular junction disorder"),
    ("Myasthenia gravis", "neuromuscular junction disorder"),
    ("Amyotrophic lateral sclerosis", "motor neuron disease"),
    ("Spinal muscular atrophy type 1", "motor neuron disease"),
    ("Duchenne muscular dystrophy", "muscular dystrophy"),
    ("Becker muscular dystrophy", "muscular dystrophy"),
    ("Facioscapulohumeral muscular dystrophy", "muscular dystrophy"),
    ("Myotonic dystrophy type 1", "muscular dystrophy"),
    ("Inclusion body myositis", "inflammatory myopathy"),
    ("Dermatomyositis", "inflammatory myopathy"),
    ("Anti-NMDA receptor encephalitis", "autoimmune encephalitis"),
    ("Neuromyelitis optica spectrum disorder", "demyelinating disease"),
    ("Creutzfeldt-Jakob disease", "prion disease"),
    ("Huntington disease", "neurodegenerative disease"),
    ("Wilson disease", "copper metabolism disorder"),
    ("Menkes disease", "copper metabolism disorder"),
    ("Hereditary hemochromatosis", "iron overload disorder"),
    ("Acute intermittent porphyria", "porphyria"),
    ("Erythropoietic protoporphyria", "porphyria"),
    ("Porphyria cutanea tarda", "porphyria"),
    ("Alpha-1 antitrypsin deficiency", "genetic liver disease"),
    ("Primary biliary cholangitis", "autoimmune liver disease"),
    ("Primary sclerosing cholangitis", "autoimmune liver disease"),
    ("Autoimmune hepatitis", "autoimmune liver disease"),
    ("Budd-Chiari syndrome", "hepatic vascular disease"),
    ("Caroli disease", "biliary malformation"),
    ("Whipple disease", "infectious disease"),
    ("IgG4-related disease", "fibroinflammatory disease"),
    ("Retroperitoneal fibrosis", "fibroinflammatory disease"),
    ("Riedel thyroiditis", "fibroinflammatory disease"),
    ("Sarcoidosis", "granulomatous disease"),
    ("Chronic granulomatous disease", "primary immunodeficiency"),
    ("Common variable immunodeficiency", "primary immunodeficiency"),
    ("Wiskott-Aldrich syndrome", "primary immunodeficiency"),
    ("Severe combined immunodeficiency", "primary immunodeficiency"),
    ("Hyper-IgE syndrome", "primary immunodeficiency"),
    ("Hereditary angioedema", "complement deficiency"),
    ("Hereditary angioedema type 1", "complement deficiency"),
    ("Familial Mediterranean fever", "autoinflammatory syndrome"),
    ("TNF receptor-associated periodic syndrome", "autoinflammatory syndrome"),
    ("Cryopyrin-associated periodic syndrome", "autoinflammatory syndrome"),
    ("Adult-onset Still disease", "autoinflammatory syndrome"),
    ("Schnitzler syndrome", "autoinflammatory syndrome"),
    ("Relapsing polychondritis", "autoimmune disease"),
    ("Systemic sclerosis", "connective tissue disease"),
    ("Mixed connective tissue disease", "connective tissue disease"),
    ("Sjögren syndrome", "connective tissue disease"),
    ("Systemic lupus erythematosus", "connective tissue disease"),
    ("Antiphospholipid syndrome", "thrombophilia"),
    ("Catastrophic antiphospholipid syndrome", "thrombophilia"),
    ("Thrombotic thrombocytopenic purpura", "thrombotic microangiopathy"),
    ("Atypical hemolytic uremic syndrome", "thrombotic microangiopathy"),
    ("Paroxysmal nocturnal hemoglobinuria", "hemolytic anemia"),
    ("Hereditary spherocytosis", "hemolytic anemia"),
    ("Glucose-6-phosphate dehydrogenase deficiency", "hemolytic anemia"),
    ("Beta-thalassemia major", "thalassemia"),
    ("Sickle cell anemia", "hemoglobinopathy"),
    ("Fanconi anemia", "bone marrow failure syndrome"),
    ("Diamond-Blackfan anemia", "bone marrow failure syndrome"),
    ("Aplastic anemia", "bone marrow failure syndrome"),
    ("Von Willebrand disease type 3", "bleeding disorder"),
    ("Hemophilia A", "bleeding disorder"),
    ("Glanzmann thrombasthenia", "bleeding disorder"),
    ("Waldenström macroglobulinemia", "lymphoma"),
    ("Mantle cell lymphoma", "lymphoma"),
    ("Burkitt lymphoma", "lymphoma"),
    ("Hodgkin lymphoma", "lymphoma"),
    ("Primary central nervous system lymphoma", "lymphoma"),
    ("Mycosis fungoides", "cutaneous T-cell lymphoma"),
    ("POEMS syndrome", "plasma cell dyscrasia"),
    ("AL amyloidosis", "amyloidosis"),
    ("Transthyretin amyloidosis", "amyloidosis"),
    ("Systemic mastocytosis", "myeloproliferative neoplasm"),
    ("Polycythemia vera", "myeloproliferative neoplasm"),
    ("Essential thrombocythemia", "myeloproliferative neoplasm"),
    ("Chronic myeloid leukemia", "myeloproliferative neoplasm"),
    ("Pheochromocytoma", "neuroendocrine tumor"),
    ("Paraganglioma", "neuroendocrine tumor"),
    ("Multiple endocrine neoplasia type 1", "hereditary cancer syndrome"),
    ("Multiple endocrine neoplasia type 2A", "hereditary cancer syndrome"),
    ("Von Hippel-Lindau disease", "hereditary cancer syndrome"),
    ("Li-Fraumeni syndrome", "hereditary cancer syndrome"),
    ("Peutz-Jeghers syndrome", "hamartomatous polyposis"),
    ("Familial adenomatous polyposis", "hereditary cancer syndrome"),
    ("Lynch syndrome", "hereditary cancer syndrome"),
    ("Neurofibromatosis type 1", "neurocutaneous syndrome"),
    ("Neurofibromatosis type 2", "neurocutaneous syndrome"),
    ("Tuberous sclerosis complex", "neurocutaneous syndrome"),
    ("Sturge-Weber syndrome", "neurocutaneous syndrome"),
    ("Hereditary hemorrhagic telangiectasia", "vascular malformation"),
    ("Klippel-Trenaunay syndrome", "vascular malformation"),
    ("Moyamoya disease", "cerebrovascular disease"),
    ("CADASIL", "cerebral small vessel disease"),
    ("Addison disease", "adrenal insufficiency"),
    ("Congenital adrenal hyperplasia", "adrenal disorder"),
    ("Cushing disease", "pituitary disorder"),
    ("Acromegaly", "pituitary disorder"),
    ("Lymphocytic hypophysitis", "pituitary disorder"),
    ("Central diabetes insipidus", "pituitary disorder"),
    ("Kallmann syndrome", "hypogonadotropic hypogonadism"),
    ("Turner syndrome", "chromosomal anomaly"),
    ("Klinefelter syndrome", "chromosomal anomaly"),
    ("Prader-Willi syndrome", "genomic imprinting disorder"),
    ("Angelman syndrome", "genomic imprinting disorder"),
    ("Marfan syndrome", "heritable connective tissue disorder"),
    ("Ehlers-Danlos syndrome, vascular type", "heritable connective tissue disorder"),
    ("Loeys-Dietz syndrome", "heritable connective tissue disorder"),
    ("Osteogenesis imperfecta", "skeletal dysplasia"),
    ("Achondroplasia", "skeletal dysplasia"),
    ("Fibrous dysplasia of bone", "bone disorder"),
    ("McCune-Albright syndrome", "bone disorder"),
    ("Paget disease of bone", "bone disorder"),
    ("Hypophosphatasia", "bone disorder"),
    ("X-linked hypophosphatemia", "phosphate metabolism disorder"),
    ("Gitelman syndrome", "renal tubulopathy"),
    ("Bartter syndrome", "renal tubulopathy"),
    ("Alport syndrome", "hereditary nephropathy"),
    ("Autosomal dominant polycystic kidney disease", "cystic kidney disease"),
    ("Cystinosis", "lysosomal storage disease"),
    ("Primary hyperoxaluria type 1", "kidney stone disease"),
    ("Anti-glomerular basement membrane disease", "glomerulonephritis"),
    ("C3 glomerulopathy", "glomerulonephritis"),
    ("Pulmonary alveolar proteinosis", "interstitial lung disease"),
    ("Lymphangioleiomyomatosis", "cystic lung disease"),
    ("Birt-Hogg-Dubé syndrome", "cystic lung disease"),
    ("Idiopathic pulmonary fibrosis", "interstitial lung disease"),
    ("Pulmonary arterial hypertension", "pulmonary hypertension"),
    ("Primary ciliary dyskinesia", "ciliopathy"),
    ("Cystic fibrosis", "genetic lung disease"),
    ("Arrhythmogenic right ventricular cardiomyopathy", "cardiomyopathy"),
    ("Hypertrophic cardiomyopathy", "cardiomyopathy"),
    ("Cardiac sarcoidosis", "cardiomyopathy"),
    ("Brugada syndrome", "channelopathy"),
    ("Long QT syndrome", "channelopathy"),
    ("Eosinophilic esophagitis", "eosinophilic gastrointestinal disorder"),
    ("Achalasia", "esophageal motility disorder"),
    ("Celiac disease", "malabsorption syndrome"),
    ("Intestinal lymphangiectasia", "protein-losing enteropathy"),
    ("Pemphigus vulgaris", "autoimmune blistering disease"),
    ("Bullous pemphigoid", "autoimmune blistering disease"),
    ("Epidermolysis bullosa simplex", "genetic skin disease"),
    ("Pyoderma gangrenosum", "neutrophilic dermatosis"),
    ("Sweet syndrome", "neutrophilic dermatosis"),
    ("Stevens-Johnson syndrome", "severe cutaneous adverse reaction"),
    ("Vogt-Koyanagi-Harada disease", "uveitis"),
    ("Birdshot chorioretinopathy", "uveitis"),
    ("Leber hereditary optic neuropathy", "optic neuropathy"),
    ("Retinitis pigmentosa", "inherited retinal dystrophy"),
    ("Susac syndrome", "autoimmune endotheliopathy"),
    ("Melioidosis", "infectious disease"),
    ("Leptospirosis", "infectious disease"),
    ("Mucormycosis", "invasive fungal infection"),
    ("Chromoblastomycosis", "chronic fungal infection"),
]

# Hand-written alternatives a model might give, for a few names: abbreviations and synonyms.
SYNONYMS = {
    "Erdheim-Chester disease": ["ECD", "Erdheim Chester disease (ECD)"],
    "Granulomatosis with polyangiitis": ["Wegener granulomatosis", "GPA (Wegener's)"],
    "Guillain-Barré syndrome": ["Guillain-Barre syndrome", "GBS", "AIDP"],
    "Kikuchi-Fujimoto disease": ["Histiocytic necrotizing lymphadenitis", "Kikuchi disease"],
    "Fabry disease": ["Anderson-Fabry disease", "alpha-galactosidase A deficiency"],
    "Systemic lupus erythematosus": ["SLE", "lupus"],
    "Thrombotic thrombocytopenic purpura": ["TTP", "Moschcowitz syndrome"],
    "Amyotrophic lateral sclerosis": ["ALS", "Lou Gehrig disease"],
    "Paroxysmal nocturnal hemoglobinuria": ["PNH", "Marchiafava-Micheli syndrome"],
    "Behçet disease": ["Behcet's disease", "Behçet's syndrome"],
    "Sjögren syndrome": ["Sjogren's syndrome", "Sjögren's disease"],
    "Waldenström macroglobulinemia": ["Waldenstrom macroglobulinemia",
                                      "lymphoplasmacytic lymphoma"],
}

QUALIFIERS = ["familial", "primary", "acquired", "juvenile", "congenital", "atypical",
              "classic", "late-onset", "severe"]
KEYBOARD = "abcdefghijklmnopqrstuvwxyz"


def typo(name: str, edits: int, rng: random.Random) -> str:
    chars = list(name)
    for _ in range(edits):
        i = rng.randrange(len(chars))
        kind = rng.choice(("delete", "insert", "substitute", "transpose"))
        if kind == "delete" and len(chars) > 1:
            del chars[i]
        elif kind == "insert":
            chars.insert(i, rng.choice(KEYBOARD))
        elif kind == "substitute":
            chars[i] = rng.choice(KEYBOARD)
        elif i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def punctuation_variants(name: str) -> list[str]:
    words = name.split()
    out = [name.replace("-", " "), name.replace("-", ""), name + ".", f"{name} (confirmed)",
           name.replace(" ", "  "), f'"{name}"', name.replace("é", "e").replace("ö", "o")
           .replace("ç", "c")]
    if len(words) > 1 and words[-1].lower() in ("disease", "syndrome"):
        out.append(f"{words[0]}'s {' '.join(words[1:])}")
        out.append(f"{' '.join(words[:-1])} {words[-1]}s")
    if "," in name:
        out.append(name.replace(",", ""))
    return out


def make_pairs(seed: int, typo_samples: int) -> list[tuple[str, str, list[str]]]:
    """(kind, prediction, labels) for every variant of every disease name."""
    rng = random.Random(seed)
    names = [n for n, _ in DISEASES]
    pairs = []
    for name, broader in DISEASES:
        labels = [name]
        pairs.append(("exact", name, labels))
        for variant in (name.lower(), name.upper(), name.title(), name.swapcase(),
                        "".join(c.upper() if rng.random() < 0.3 else c for c in name)):
            pairs.append(("case", variant, labels))
        pairs += [("punctuation", v, labels) for v in punctuation_variants(name)]
        words = name.split()
        hyper = [broader, f"{broader} ({name.split()[0]})", f"{rng.choice(QUALIFIERS)} {name}",
                 f"{name} type 2", f"{name} with renal involvement"]
        if len(words) > 2:
            hyper.append(" ".join(words[1:]))  # drop a leading qualifier
        pairs += [("hypernym", v, labels) for v in hyper]
        trunc = [name[: max(1, int(len(name) * f))] for f in (0.5, 0.7, 0.85, 0.95)]
        if len(words) > 1:
            trunc += [" ".join(words[:-1]), words[0]]
        pairs += [("truncation", v, labels) for v in trunc]
        for edits in (1, 2, 3):
            pairs += [("typo", typo(name, edits, rng), labels) for _ in range(typo_samples)]
        for other in rng.sample([n for n in names if n != name], 8):
            pairs.append(("unrelated", other, labels))
        siblings = [n for n in names if n != name and n.split()[0] == name.split()[0]]
        pairs += [("sibling", s, labels) for s in siblings]
        pairs += [("synonym", s, labels) for s in SYNONYMS.get(name, [])]
        pairs += [("synonym_label", name.lower(), [name, s]) for s in SYNONYMS.get(name, [])]
    return pairs


def make_responses(pairs, n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Realistic rollouts: a reasoning block of 1-3 KB, then the answer (some malformed)."""
    rng = random.Random(seed)
    findings = ["bilateral leg pain", "elevated CRP", "a 4 cm adrenal mass", "areflexia",
                "proteinuria of 1.2 g/day", "foamy histiocytes on biopsy", "Kayser-Fleischer "
                "rings", "ascending weakness after diarrhoea", "a weak left radial pulse"]
    responses, labels = [], []
    for i in range(n):
        _, prediction, labs = pairs[rng.randrange(len(pairs))]
        think = " ".join(f"The patient shows {rng.choice(findings)}, which narrows the "
                         "differential." for _ in range(rng.randint(15, 45)))
        form = i % 20
        if form == 0:
            text = f"<think>{think}</think>\nThe diagnosis is {prediction}."  # no answer
        elif form == 1:
            text = f"<answer>{prediction}</answer>"  # think dropped
        elif form == 2:
            text = f"<think>{think}</think>\n<answer>{prediction}</answer>知情人士指出，诊断为此。"
        else:
            text = f"<think>\n{think}\n</think>\n<answer>\n{prediction}\n</answer>"
        responses.append(text)
        labels.append(labs)
    return responses, labels


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--typo-samples", type=int, default=6,
                        help="typo variants per name and per edit count (1, 2, 3)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    pairs = make_pairs(args.seed, args.typo_samples)
    decisions = {m: [reward.similarity(p, labs, m) > 0.8 for _, p, labs in pairs]
                 for m in reward.MATCHERS}
    by_kind = collections.defaultdict(lambda: [0, 0, 0])  # pairs, agree, passed (difflib)
    disagreements = []
    for (kind, prediction, labels), fast, seed_rule in zip(pairs, decisions["rapidfuzz"],
                                                            decisions["difflib"]):
        by_kind[kind][0] += 1
        by_kind[kind][1] += fast == seed_rule
        by_kind[kind][2] += seed_rule
        if fast != seed_rule:
            disagreements.append((kind, prediction, labels,
                                  reward.similarity(prediction, labels, "rapidfuzz"),
                                  reward.similarity(prediction, labels, "difflib")))
    agree = sum(row[1] for row in by_kind.values())

    print(f"{len(pairs)} pairs from {len(DISEASES)} disease names")
    print(f"{'kind':<14}{'pairs':>7}{'agree':>9}{'pass (difflib)':>16}")
    for kind, (n, a, passed) in by_kind.items():
        print(f"{kind:<14}{n:>7}{a / n:>9.2%}{passed / n:>16.1%}")
    print(f"agreement: {agree}/{len(pairs)} = {agree / len(pairs):.4%}")
    for kind, prediction, labels, fast, slow in disagreements[:20]:
        print(f"  disagree [{kind}] {prediction!r} vs {labels}: rapidfuzz {fast:.4f}, "
              f"difflib {slow:.4f}")

    per_pair = {}
    for matcher in reward.MATCHERS:
        seconds = timed(lambda: [reward.similarity(p, labs, matcher) for _, p, labs in pairs],
                        args.repeats)
        per_pair[matcher] = seconds / len(pairs) * 1e6
        print(f"{matcher}: {per_pair[matcher]:.1f} us per similarity")

    responses, labels = make_responses(pairs, 1024, args.seed)
    batch_ms = {}
    for matcher in reward.MATCHERS:
        batch_ms[matcher] = 1e3 * timed(lambda: reward.score_batch(responses, labels,
                                                                   matcher=matcher),
                                        args.repeats)
        print(f"score_batch of 1024 responses ({matcher}): {batch_ms[matcher]:.1f} ms "
              f"(mean response {sum(map(len, responses)) / len(responses):.0f} chars)")

    analysis_ms = 1e3 * timed(lambda: summarize([analyze_response(r) for r in responses]),
                              args.repeats)
    print(f"analyze_response + summarize of the same 1024: {analysis_ms:.1f} ms")

    print(json.dumps({
        "pairs": len(pairs), "names": len(DISEASES), "agreement": agree / len(pairs),
        "disagreements": len(disagreements),
        "agreement_by_kind": {k: v[1] / v[0] for k, v in by_kind.items()},
        "us_per_similarity": per_pair, "score_batch_1024_ms": batch_ms,
        "analyze_1024_ms": analysis_ms,
        "mean_response_chars": sum(map(len, responses)) / len(responses),
    }))


if __name__ == "__main__":
    main()
