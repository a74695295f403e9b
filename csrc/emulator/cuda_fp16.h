// Stand-in for the CUDA header of this name when csrc/ is built for the CPU emulator.
#pragma once
#include "emu.h"
