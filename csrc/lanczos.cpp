// Thick-restart Lanczos driver (issue 3).
#include "hbk/dense.h"
