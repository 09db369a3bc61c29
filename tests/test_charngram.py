"""Char n-gram sketches (features.charngram): cosines track exact char TF-IDF, the fitted state round-trips without
pickle, and the version names what the vectors depend on."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from features.charngram import N_FEATURES, CharNgramEmbedder

TEXTS = [
    "Sony Bravia KDL-40V4100 40in LCD HDTV black",
    "Sony KDL40V4100 Bravia 40 inch LCD television",
    "Samsung UN46B6000 46in LED HDTV",
    "Samsung UN-46B6000 LED TV 46 inch",
    "Canon EOS Rebel T1i 15.1MP digital SLR camera kit",
    "Canon Rebel T1i EOS DSLR 15.1 MP with 18-55mm lens",
    "Apple iPod nano 8GB silver 5th generation",
    "Apple iPod nano 5G 8 GB silver",
    "Logitech MX Revolution cordless laser mouse",
    "Logitech MX-Revolution wireless mouse",
] * 3  # repeated rows: IDF over a corpus where every record has a twin


def test_sketch_cosines_track_exact_char_tfidf_and_find_the_twins():
    texts = [f"{t} #{i // 10}" for i, t in enumerate(TEXTS)]
    emb = CharNgramEmbedder.fit(texts, dim=384)
    vectors = emb(texts)
    assert vectors.shape == (30, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    exact = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True).fit_transform(texts)
    exact = (exact @ exact.T).toarray()
    sketch = vectors @ vectors.T
    off = ~np.eye(30, dtype=bool)
    assert np.corrcoef(exact[off], sketch[off])[0, 1] > 0.95  # JL: cosines kept to about 1/sqrt(dim)
    sketch[~off] = -np.inf
    twin = [i + 1 if i % 2 == 0 else i - 1 for i in range(30)]
    nearest_other = [int(np.argmax(np.where(np.arange(30) // 10 == i // 10, sketch[i], -np.inf))) for i in range(30)]
    assert nearest_other == twin  # within one copy of the list, every record's nearest is its twin


def test_idf_matters_and_state_round_trips_without_pickle():
    fitted = CharNgramEmbedder.fit(TEXTS, dim=64, seed=3)
    plain = CharNgramEmbedder(dim=64, seed=3)
    assert fitted.fitted_on == len(TEXTS) and fitted.idf.shape == (N_FEATURES,)
    assert fitted.version != plain.version and "d64-s3" in fitted.version and plain.version.endswith("idfnone")
    assert not np.allclose(fitted(TEXTS[:4]), plain(TEXTS[:4]))
    back = CharNgramEmbedder.from_bytes(fitted.to_bytes())
    assert back.version == fitted.version
    np.testing.assert_array_equal(back(TEXTS), fitted(TEXTS))
    np.testing.assert_array_equal(CharNgramEmbedder.fit(TEXTS, dim=64, seed=3)(TEXTS), fitted(TEXTS))  # seeded
    # batching does not change a vector: new products land in the space of the stored ones
    np.testing.assert_allclose(fitted(TEXTS, batch_size=7), fitted(TEXTS), atol=1e-6)
    with pytest.raises(ValueError, match="no texts"):
        CharNgramEmbedder.fit([])
    with pytest.raises(ValueError, match="refit"):
        CharNgramEmbedder(idf=np.ones(5, np.float32))
