"""Property-based fuzzing of what users hand kfuse (issue 10).

    python -m pytest -q -p no:xdist tests/fuzz            # fixed-seed fast slice
    python -m pytest -q -p no:xdist tests/fuzz -m slow    # random, larger budget

Strict xfails mark today's known failures, each with the work item that fixes
it; they fail (XPASS strict) once the fix lands, and the mark is then removed.
"""
