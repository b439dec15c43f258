"""The scikit-learn estimators featx builds: each built-in kind's pipeline steps and the classifier constructors
the sweeps, refits and exports share (imported lazily: no scikit-learn at import)."""

from __future__ import annotations

from typing import Any

from featx.heads.kinds import Steps

SWEEP_TOL = 1e-3  # solver tolerance during a sweep: only the ranking on val matters there
REFIT_TOL = 1e-4  # the final model: scikit-learn's default tolerance


def _logreg_steps() -> Steps:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    return (("standardscaler", StandardScaler), ("logisticregression", LogisticRegression))


def _linear_svm_steps() -> Steps:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return (("standardscaler", StandardScaler), ("linearsvc", LinearSVC))


def _rbf_svm_steps() -> Steps:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return (("standardscaler", StandardScaler), ("svc", SVC))


def _knn_steps() -> Steps:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer

    return (("normalizer", Normalizer), ("kneighborsclassifier", KNeighborsClassifier))


def _pipeline(steps: Steps, *estimators: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return Pipeline([(name, est) for (name, _), est in zip(steps, estimators)])


def _logreg(C: float, tol: float = REFIT_TOL) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000, tol=tol)


def _linear_svc(C: float, *, dual: bool | str = "auto", tol: float = REFIT_TOL) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, max_iter=5000, dual=dual, tol=tol)


def _svc(params: dict[str, Any]) -> Any:
    from sklearn.svm import SVC

    return SVC(kernel="rbf", C=params.get("C", 1.0), gamma=params.get("gamma", "scale"))


def _knn(k: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    # L2-normalised features + euclidean distance = cosine neighbours, the usual k-NN probe. Brute force always:
    # a tree index (chosen automatically for narrow features) would put Cython tree objects into the head file.
    return KNeighborsClassifier(n_neighbors=k, weights="distance", algorithm="brute")


def _build_logreg(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_logreg_steps(), StandardScaler(), _logreg(params.get("C", 1.0)))


def _build_linear_svm(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_linear_svm_steps(), StandardScaler(), _linear_svc(params.get("C", 1.0)))


def _build_rbf_svm(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import StandardScaler

    return _pipeline(_rbf_svm_steps(), StandardScaler(), _svc(params))


def _build_knn(params: dict[str, Any]) -> Any:
    from sklearn.preprocessing import Normalizer

    return _pipeline(_knn_steps(), Normalizer(), _knn(params.get("n_neighbors", 5)))
